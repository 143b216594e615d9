"""AsyncEngine: the engine loop on a thread of this process, an asyncio API in front of it.

The engine thread owns the EngineCore (and with it every device tensor): asyncio code hands it
commands through a queue and gets results back through futures and per-request streams. Events
reach asyncio in batches: one `call_soon_threadsafe` wakes every stream that got something since the
last flush, at most every `flush_interval` seconds, so thousands of sessions do not mean thousands
of cross-thread calls per step.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from sinkcache.engine import EngineCore
from sinkcache.engine_loop import EngineLoop, SessionInfo, engine_stats, session_info
from sinkcache.inputs import AppendInput
from sinkcache.sampling import GenerationParams
from sinkcache.session import (
    EngineStoppedError,
    Event,
    SessionNotFoundError,
    TokensEvent,
    TurnEndEvent,
)


class RequestStream:
    """One request's events: pushed by the engine thread, iterated by asyncio (coalesced)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: deque[Event | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False

    # engine thread
    def push(self, event: Event) -> None:
        self._events.append(event)

    def fail(self, error: BaseException) -> None:
        self._events.append(error)

    # asyncio thread
    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        while not self._events:
            if self._done:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        first = self._events.popleft()
        if isinstance(first, BaseException):
            self._done = True
            raise first
        if isinstance(first, TurnEndEvent):
            self._done = True
        elif isinstance(first, TokensEvent):
            # Coalesce consecutive token events into one.
            ids, text, stream_pos = list(first.ids), [first.text], first.stream_pos
            while self._events and isinstance(self._events[0], TokensEvent):
                more = self._events.popleft()
                ids += more.ids
                text.append(more.text)
                stream_pos = more.stream_pos
            first = TokensEvent(ids, "".join(text), stream_pos)
        return first


class AsyncEngine:
    """Owns an EngineCore and the thread that runs its EngineLoop."""

    def __init__(
        self, core: EngineCore, flush_interval: float = 0.005, max_events_per_s: float = 5000.0
    ) -> None:
        self.core = core
        self.loop = EngineLoop(core, self._deliver, flush_interval, max_events_per_s)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._steps_taken = 0

    @property
    def error(self) -> BaseException | None:
        return self.loop.error

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self.loop.run, name="sinkcache-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self.loop.stop()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # -- API ---------------------------------------------------------------------------------------
    async def open_session(
        self, session_id: str | None = None, stream_base: int = 0
    ) -> SessionInfo:
        session_id = session_id or uuid.uuid4().hex
        core = self.core
        return await self._call(
            lambda: session_info(core, core.open_session(session_id, stream_base))
        )

    async def session_info(self, session_id: str, settled: bool = False) -> SessionInfo:
        """The session's state; `settled` waits until its running and queued requests are done
        (so the stream position is final, e.g. for a client resuming after a drop)."""
        core = self.core
        if not settled:
            return await self._call(lambda: session_info(core, core.session(session_id)))
        loop = self._loop
        future: asyncio.Future[SessionInfo] = loop.create_future()

        def on_idle(session) -> None:
            if session is None:
                error = SessionNotFoundError(f"session {session_id!r} was closed")
                loop.call_soon_threadsafe(_set_exception, future, error)
            else:
                loop.call_soon_threadsafe(_set_result, future, session_info(core, session))

        await self._call(lambda: core.when_idle(session_id, on_idle))
        return await future

    async def append(
        self,
        session_id: str,
        item: AppendInput,
        generation: GenerationParams | None = None,
        score: bool = False,
        max_chunk: int | None = None,
    ) -> AsyncIterator[Event]:
        """Queue an append; iterate the result for tokens (if generating), scores and the turn end.

        Validation errors raise here, before anything is queued.
        """
        stream = RequestStream(self._loop)
        await self._call(
            lambda: self.core.submit(session_id, item, generation, score, stream, max_chunk)
        )
        return stream

    async def cancel(self, session_id: str) -> bool:
        return await self._call(lambda: self.core.cancel(session_id))

    async def close(self, session_id: str) -> None:
        await self._call(lambda: self.core.close(session_id))

    async def held_tokens(self, session_id: str) -> list[int]:
        return await self._call(lambda: self.core.held_tokens(session_id))

    async def stats(self) -> dict[str, Any]:
        """A snapshot for metrics and the Stats RPC (read without locking: counters only)."""
        stats = engine_stats(self.core)
        stats["engine_rss_bytes"] = 0  # the engine shares this process
        return stats

    async def take_step_seconds(self) -> list[float]:
        """Step durations recorded since the last call (at most the last 4096), for histograms."""
        counters = self.core.counters
        samples = counters.step_seconds_after(self._steps_taken)
        self._steps_taken = counters.steps
        return samples

    # -- plumbing ----------------------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Any]) -> Any:
        if self.loop.stopping or self.loop.error is not None:
            raise EngineStoppedError("the engine is not running")
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()

        def command() -> None:
            try:
                value = fn()
            except BaseException as error:  # delivered to the caller
                loop.call_soon_threadsafe(_set_exception, future, error)
            else:
                loop.call_soon_threadsafe(_set_result, future, value)

        self.loop.post(command)
        return await future

    def _deliver(self, sinks: set[RequestStream]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_wake_all, sinks)


def _wake_all(sinks: set[RequestStream]) -> None:
    for sink in sinks:
        sink.wake()


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
