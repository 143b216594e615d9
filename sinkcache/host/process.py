"""ProcessEngine: the engine loop in a child process, the `Engine` API in this one.

Why a process: a replica's engine loop and its gRPC server are both Python. In one process they
share one GIL, and the engine thread waits for it whenever it comes back from the device, so the
GPU idles while gRPC encodes messages. Here the child owns the EngineCore (and the GPU) and runs
nothing else; this process serves the network (vLLM's V1 engine-core process makes the same split).
They share one socket pair: commands and their replies as single pickled messages, and each flush
of reply events as one message for all requests together.

The child is started as `python -m sinkcache.host.process --fd N` (not multiprocessing's spawn,
which re-imports the parent's __main__: under Ray that is the worker script) and stops when its
parent does (killed with it on Linux, else when its socket closes). This module's parent side
imports no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from sinkcache.config import EngineConfig
from sinkcache.errors import EngineStoppedError
from sinkcache.host.client import EngineClient
from sinkcache.host.commands import Command

log = logging.getLogger(__name__)


class ProcessEngine(EngineClient):
    """An engine in a child process, reached through the asyncio `Engine` API."""

    def __init__(self, process: subprocess.Popen, conn: Connection) -> None:
        super().__init__()
        self._process = process
        self._conn = conn
        self._outgoing: list[tuple[int, Command]] = []  # calls made since the loop last ran

    @classmethod
    async def launch(
        cls, config: EngineConfig, ready_timeout_s: float = 900.0, builder: str | None = None
    ) -> ProcessEngine:
        """Start the child and wait until its engine is built (model loaded, graphs captured).
        `builder` ("module:function", for benchmarks) builds the child's EngineCore from the
        config instead of sinkcache.host.builder.build_core."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The child imports what this process can import (Ray adds its working dir at run time).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        child = ["--fd", str(theirs.fileno()), "--parent", str(os.getpid())]
        process = subprocess.Popen(
            [sys.executable, "-m", "sinkcache.host.process", *child],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        conn = Connection(ours.detach())
        engine = cls(process, conn)
        loop = asyncio.get_running_loop()
        try:
            conn.send((config, builder))
            if not await loop.run_in_executor(None, conn.poll, ready_timeout_s):
                raise EngineStoppedError(f"the engine process was not ready in {ready_timeout_s} s")
            kind, payload = await loop.run_in_executor(None, conn.recv)
        except (EOFError, OSError):
            kind, payload = "failed", f"the engine process exited ({process.wait()})"
        except BaseException:
            process.kill()
            raise
        if kind != "ready":
            process.kill()
            raise EngineStoppedError(f"the engine process could not start: {payload}")
        engine._loop = loop
        threading.Thread(target=engine._read, name="sinkcache-engine-reader", daemon=True).start()
        return engine

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._send_calls()
        with contextlib.suppress(OSError):
            self._conn.send(("stop",))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._process.wait, timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("engine process did not stop in %.0f s; killing it", timeout_s)
            self._process.kill()
            await loop.run_in_executor(None, self._process.wait)

    @property
    def pid(self) -> int:
        return self._process.pid

    # -- transport -----------------------------------------------------------------------------------
    def _send(self, call_id: int, command: Command) -> None:
        """Calls made in one pass of the event loop go to the child as one message (a message
        costs both processes a system call and a pickle header; the child runs them together)."""
        if not self._outgoing:
            self._loop.call_soon(self._send_calls)
        self._outgoing.append((call_id, command))

    def _send_calls(self) -> None:
        calls, self._outgoing = self._outgoing, []
        if not calls:
            return
        try:
            self._conn.send(("calls", calls))  # only the event loop's thread sends
        except OSError:
            gone = EngineStoppedError("the engine process is gone")
            for call_id, _ in calls:
                self._on_reply(call_id, False, gone)

    def _read(self) -> None:
        """Reader thread: every message from the child is handled on the event loop."""
        loop = self._loop
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # one message that would not unpickle; the stream is still whole
                log.exception("unreadable message from the engine process")
                continue
            if loop.is_closed():
                return
            loop.call_soon_threadsafe(self._dispatch, message)
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._child_gone)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "events":
            self._on_events(message[1], message[2])
        elif kind == "replies":
            for reply in message[1]:
                self._on_reply(*reply)
        elif kind == "failed":
            self._error = EngineStoppedError(f"engine failed: {message[1]}")

    def _child_gone(self) -> None:
        error = self._error
        if error is None:
            error = EngineStoppedError(f"the engine process exited (code {self._process.poll()})")
            if not self._stopping:
                log.error("%s", error)
        self._on_lost(error)


# -- the child -----------------------------------------------------------------------------------------
class _Child:
    """The child's side: one engine loop, fed commands by a reader thread, reporting back."""

    def __init__(self, conn: Connection, config: EngineConfig, builder: str | None) -> None:
        import importlib

        import psutil

        from sinkcache.host.builder import build_core
        from sinkcache.host.loop import EngineLoop, LoopCommands, take_events

        self.conn = conn
        self._replies: list[tuple[int, bool, Any]] = []
        if builder is not None:
            module, name = builder.split(":")
            build_core = getattr(importlib.import_module(module), name)
        core = build_core(config)
        rss = psutil.Process().memory_info
        self.commands = LoopCommands(core, lambda: rss().rss, os.getpid())
        self._take_events = take_events
        self.loop = EngineLoop(
            core, self._deliver, config.flush_interval_s, config.max_events_per_s
        )

    def serve(self) -> None:
        self.conn.send(("ready", os.getpid()))
        threading.Thread(target=self._read, name="sinkcache-commands", daemon=True).start()
        self.loop.run()
        self._send_replies()
        if self.loop.error is not None:
            self.conn.send(("failed", f"{type(self.loop.error).__name__}: {self.loop.error}"))

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: stop too
                self.loop.stop()
                return
            if message[0] == "stop":
                self.loop.stop()
                return
            self.loop.post(functools.partial(self._run_calls, message[1]))

    # on the loop's thread
    def _run_calls(self, calls: list[tuple[int, Command]]) -> None:
        for call_id, command in calls:
            self.commands.run(command, functools.partial(self._reply, call_id))

    def _reply(self, call_id: int, ok: bool, value: Any) -> None:
        """Replies go out together: after the commands run with them, or before the next events
        (so a reply never comes after events that followed it)."""
        if not self._replies:
            self.loop.post(self._send_replies)
        self._replies.append((call_id, ok, value))

    def _send_replies(self) -> None:
        replies, self._replies = self._replies, []
        if replies:
            self.conn.send(("replies", replies))

    def _deliver(self, outboxes: set, snapshots: list) -> None:
        self._send_replies()
        self.conn.send(("events", self._take_events(outboxes), snapshots))


def _die_with(parent: int) -> None:
    """Be killed when `parent` dies, at once and even while the engine is still being built
    (the socket's end is noticed only once it serves). Otherwise a replica killed during its
    start leaves a child loading the model, holding the CPU and GPU memory its replacement needs.
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere the socket's end still stops the child."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="sinkcache engine process (started by ProcessEngine)"
    )
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, help="the process to die with")
    args = parser.parse_args()
    if args.parent:
        _die_with(args.parent)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s engine[{os.getpid()}] %(levelname)s %(message)s"
    )
    conn = Connection(args.fd)
    config, builder = conn.recv()
    try:
        child = _Child(conn, config, builder)
    except BaseException as error:
        log.exception("engine could not start")
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{type(error).__name__}: {error}"))
        sys.exit(1)
    child.serve()


if __name__ == "__main__":
    main()
