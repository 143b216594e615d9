"""How an engine core runs and is reached: its loop, the commands it takes, and two hosts.

`ThreadEngine` runs the loop on a thread of the caller's process; `ProcessEngine` runs it in a
child process (the replica default). Both are `Engine`s (protocol.py) with one client body
(client.py) and one loop-side body (loop.py): only the transport between them differs.
"""
