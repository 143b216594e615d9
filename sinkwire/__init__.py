"""sinkwire: the sinkserve.v1 gRPC contract in Python, shared by servers and clients.

The generated messages and stubs (`sinkwire.v1`), the error that ends a stream with a status, the
session-id format, and the gRPC options of every server and channel. No torch, no Ray, no engine:
a gateway or a client that imports it pays for grpcio alone.
"""
