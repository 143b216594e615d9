"""ProcessEngine: the engine loop in a child process, the AsyncEngine API in this one.

Why a process: a replica's engine loop and its gRPC server are both Python. In one process they
share one GIL, and the engine thread waits for it every time it comes back from the device, so
the GPU idles while gRPC encodes messages. Here the child owns the EngineCore (and the GPU) and
runs nothing else; this process serves the network. They talk over a socket pair with pickled
messages: commands and their replies one by one (opens, appends, stats: a few hundred a
second), reply events once per flush for all sessions at once.
vLLM's V1 engine-core process makes the same split.

The child is started as `python -m sinkcache.engine_process --fd N` (not multiprocessing's spawn,
which re-imports the parent's __main__: under Ray that is the worker script) and stops when its
parent does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import psutil

from sinkcache.async_engine import RequestStream
from sinkcache.engine_loop import EngineLoop, SessionInfo, engine_stats, session_info
from sinkcache.inputs import AppendInput
from sinkcache.sampling import GenerationParams
from sinkcache.session import (
    EngineError,
    EngineStoppedError,
    SessionNotFoundError,
    TurnEndEvent,
)

if TYPE_CHECKING:  # the builder imports this module
    from sinkcache.builder import EngineConfig

log = logging.getLogger(__name__)


class ProcessEngine:
    """An engine in a child process, with the same asyncio API as AsyncEngine."""

    def __init__(self, process: subprocess.Popen, conn: Connection) -> None:
        self._process = process
        self._conn = conn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, RequestStream] = {}
        self._stopping = False
        self._last_stats: dict[str, Any] | None = None
        self._pending_stats: asyncio.Future | None = None
        self.error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    async def launch(cls, config: EngineConfig, ready_timeout_s: float = 900.0) -> ProcessEngine:
        """Start the child, wait until its engine is built (model loaded, graphs captured)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The child imports what this process can import (Ray adds its working dir at run time).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        process = subprocess.Popen(
            [sys.executable, "-m", "sinkcache.engine_process", "--fd", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        conn = Connection(ours.detach())
        engine = cls(process, conn)
        loop = asyncio.get_running_loop()
        try:
            conn.send(config)
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
        with contextlib.suppress(OSError):
            self._send(("stop",))
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

    # -- API (as AsyncEngine) ----------------------------------------------------------------------
    async def open_session(
        self, session_id: str | None = None, stream_base: int = 0
    ) -> SessionInfo:
        return await self._call("open_session", session_id, stream_base)

    async def session_info(self, session_id: str, settled: bool = False) -> SessionInfo:
        """The session's state; `settled` waits until its running and queued requests are done."""
        return await self._call("session_info", session_id, settled)

    async def append(
        self,
        session_id: str,
        item: AppendInput,
        generation: GenerationParams | None = None,
        score: bool = False,
        max_chunk: int | None = None,
    ) -> AsyncIterator[Any]:
        """Queue an append; validation errors raise here, before anything is queued."""
        request_id = next(self._ids)
        stream = RequestStream(self._loop)
        self._streams[request_id] = stream
        try:
            await self._call("submit", request_id, session_id, item, generation, score, max_chunk)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    async def cancel(self, session_id: str) -> bool:
        return await self._call("cancel", session_id)

    async def close(self, session_id: str) -> None:
        await self._call("close", session_id)

    async def held_tokens(self, session_id: str) -> list[int]:
        return await self._call("held_tokens", session_id)

    async def stats(self, max_wait_s: float = 0.5) -> dict[str, Any]:
        """A fresh snapshot from the child, or the last one if the child is busy longer than
        `max_wait_s` (a long step must not make health checks and routing think it is gone)."""
        if self._pending_stats is None or self._pending_stats.done():
            self._pending_stats = asyncio.ensure_future(self._call("stats"))
            self._pending_stats.add_done_callback(self._keep_stats)
        if self._last_stats is None:
            return dict(await asyncio.shield(self._pending_stats))
        with contextlib.suppress(TimeoutError):
            return dict(await asyncio.wait_for(asyncio.shield(self._pending_stats), max_wait_s))
        return dict(self._last_stats)

    def _keep_stats(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._last_stats = future.result()

    async def take_step_seconds(self) -> list[float]:
        """Step durations recorded since the last call (at most the last 4096), for histograms."""
        return await self._call("take_step_seconds")

    # -- plumbing ----------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        self._conn.send(message)  # only the event loop's thread sends

    async def _call(self, op: str, *args: Any) -> Any:
        if self._stopping or self.error is not None:
            raise EngineStoppedError("the engine is not running")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = future
        try:
            self._send(("call", call_id, op, args))
        except OSError:
            self._calls.pop(call_id, None)
            raise EngineStoppedError("the engine process is gone") from None
        return await future

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
            loop.call_soon_threadsafe(self._lost)

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "events":
            for request_id, events in message[1]:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                for event in events:
                    if isinstance(event, BaseException):
                        stream.fail(event)
                    else:
                        stream.push(event)
                if isinstance(events[-1], BaseException | TurnEndEvent):
                    del self._streams[request_id]
                stream.wake()
        elif kind == "reply":
            _, call_id, ok, value = message
            future = self._calls.pop(call_id, None)
            if future is not None and not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        elif kind == "failed":
            self.error = EngineStoppedError(f"engine failed: {message[1]}")

    def _lost(self) -> None:
        """The child is gone: whoever still waits gets EngineStoppedError."""
        if not self._stopping and self.error is None:
            code = self._process.poll()
            self.error = EngineStoppedError(f"the engine process exited (code {code})")
            log.error("%s", self.error)
        error = self.error or EngineStoppedError("the engine stopped")
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()
        for stream in self._streams.values():
            stream.fail(error)
            stream.wake()
        self._streams.clear()


# -- the child ---------------------------------------------------------------------------------------
class _Outbox:
    """A request's events in the child, collected until the next flush."""

    __slots__ = ("events", "request_id")

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.events: list[Any] = []

    def push(self, event: Any) -> None:
        self.events.append(event)

    def fail(self, error: BaseException) -> None:
        self.events.append(_portable(error))


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling (ours do), else an EngineError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return EngineError(f"{type(error).__name__}: {error}")
    return error


class _ChildEngine:
    """The child's side: runs commands from the parent against the core, reports back."""

    def __init__(self, conn: Connection, config: EngineConfig) -> None:
        from sinkcache.builder import build_core

        self.conn = conn
        self.core = build_core(config)
        self.loop = EngineLoop(
            self.core,
            self._deliver,
            config.flush_interval_s,
            config.max_events_per_s,
        )
        self._steps_taken = 0

    def serve(self) -> None:
        self.conn.send(("ready", os.getpid()))
        threading.Thread(target=self._read, name="sinkcache-commands", daemon=True).start()
        self.loop.run()
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
            _, call_id, op, args = message
            self.loop.post(self._command(call_id, getattr(self, f"_op_{op}"), args))

    def _command(self, call_id: int, op: Callable[..., Any], args: tuple) -> Callable[[], None]:
        def run() -> None:
            try:
                value = op(call_id, *args)
            except BaseException as error:
                self._reply(call_id, False, _portable(error))
            else:
                if value is not _DEFERRED:
                    self._reply(call_id, True, value)

        return run

    def _reply(self, call_id: int, ok: bool, value: Any) -> None:
        self.conn.send(("reply", call_id, ok, value))

    # commands: each gets its call id first
    def _op_open_session(self, _: int, session_id: str | None, stream_base: int) -> SessionInfo:
        session = self.core.open_session(session_id or uuid.uuid4().hex, stream_base)
        return session_info(self.core, session)

    def _op_session_info(self, call_id: int, session_id: str, settled: bool) -> Any:
        if not settled:
            return session_info(self.core, self.core.session(session_id))

        def on_idle(session) -> None:
            if session is None:
                error = SessionNotFoundError(f"session {session_id!r} was closed")
                self._reply(call_id, False, error)
            else:
                self._reply(call_id, True, session_info(self.core, session))

        self.core.when_idle(session_id, on_idle)
        return _DEFERRED

    def _op_submit(
        self,
        _: int,
        request_id: int,
        session_id: str,
        item: AppendInput,
        generation: GenerationParams | None,
        score: bool,
        max_chunk: int | None,
    ) -> None:
        self.core.submit(session_id, item, generation, score, _Outbox(request_id), max_chunk)

    def _op_cancel(self, _: int, session_id: str) -> bool:
        return self.core.cancel(session_id)

    def _op_close(self, _: int, session_id: str) -> None:
        self.core.close(session_id)

    def _op_held_tokens(self, _: int, session_id: str) -> list[int]:
        return self.core.held_tokens(session_id)

    # outputs
    def _deliver(self, outboxes: set[_Outbox]) -> None:
        batch = []
        for outbox in outboxes:
            if outbox.events:
                batch.append((outbox.request_id, outbox.events))
                outbox.events = []
        if batch:
            self.conn.send(("events", batch))

    def _op_stats(self, _: int) -> dict[str, Any]:
        stats = engine_stats(self.core)
        stats["engine_rss_bytes"] = psutil.Process().memory_info().rss
        return stats

    def _op_take_step_seconds(self, _: int) -> list[float]:
        counters = self.core.counters
        samples = counters.step_seconds_after(self._steps_taken)
        self._steps_taken = counters.steps
        return samples


_DEFERRED = object()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="sinkcache engine process (started by ProcessEngine)"
    )
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s engine[{os.getpid()}] %(levelname)s %(message)s"
    )
    conn = Connection(args.fd)
    config = conn.recv()
    try:
        child = _ChildEngine(conn, config)
    except BaseException as error:
        log.exception("engine could not start")
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{type(error).__name__}: {error}"))
        sys.exit(1)
    child.serve()


if __name__ == "__main__":
    main()
