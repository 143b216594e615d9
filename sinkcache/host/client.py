"""EngineClient: the asyncio side of an engine, the same over every transport.

Calls become commands (sinkcache.host.commands); their replies resolve futures; each flush of the
engine loop arrives as one batch of request events, which wakes the streams that got something.
A host subclass supplies `_send` and feeds `_on_reply`, `_on_events` and `_on_lost` on the event
loop's thread. Torch-free: the engine itself may live in another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from sinkcache.errors import EngineStoppedError
from sinkcache.events import Event, SessionSnapshot, TokensEvent, TurnEndEvent
from sinkcache.host.commands import (
    CancelReply,
    CloseSession,
    Command,
    EventBatch,
    GetHeldTokens,
    GetSessionInfo,
    GetStats,
    HoldDecode,
    OffloadSession,
    OpenSession,
    RestoreSession,
    Submit,
    TakeStepSeconds,
    WatchSnapshots,
)
from sinkcache.host.protocol import EngineStats, SessionInfo
from sinkcache.inputs import AppendInput, GenerationParams


class RequestStream:
    """One request's events, iterated by asyncio; consecutive token events come out coalesced."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: deque[Event | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False

    def push(self, event: Event | BaseException) -> None:
        self._events.append(event)

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
            ids, text, stream_pos = list(first.ids), [first.text], first.stream_pos
            while self._events and isinstance(self._events[0], TokensEvent):
                more = self._events.popleft()
                ids += more.ids
                text.append(more.text)
                stream_pos = more.stream_pos
            first = TokensEvent(ids, "".join(text), stream_pos)
        return first


class EngineClient:
    """An `Engine` (sinkcache.host.protocol) over a transport that subclasses provide."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, RequestStream] = {}
        self._stopping = False
        self._error: BaseException | None = None
        self._last_stats: EngineStats | None = None
        self._pending_stats: asyncio.Future[EngineStats] | None = None
        self._on_snapshots: Callable[[list[SessionSnapshot]], None] | None = None

    @property
    def error(self) -> BaseException | None:
        return self._error

    # -- the transport (subclasses) ----------------------------------------------------------------
    def _send(self, call_id: int, command: Command) -> None:
        """Hand `command` to the engine loop; raise OSError if it cannot be reached."""
        raise NotImplementedError

    # -- API ---------------------------------------------------------------------------------------
    async def open_session(
        self, session_id: str | None = None, stream_base: int = 0
    ) -> SessionInfo:
        return await self._call(OpenSession(session_id, stream_base))

    async def session_info(self, session_id: str, settled: bool = False) -> SessionInfo:
        """The session's state; `settled` waits until its running and queued requests are done
        (so the stream position is final, e.g. for a client resuming after a drop)."""
        return await self._call(GetSessionInfo(session_id, settled))

    async def append(
        self,
        session_id: str,
        item: AppendInput,
        generation: GenerationParams | None = None,
        score: bool = False,
        max_chunk: int | None = None,
    ) -> AsyncIterator[Event]:
        """Queue an append; iterate the result for tokens (if generating), scores and the turn end.
        Validation errors raise here, before anything is queued."""
        request_id = next(self._ids)
        stream = RequestStream(self._loop)
        self._streams[request_id] = stream
        try:
            await self._call(Submit(request_id, session_id, item, generation, score, max_chunk))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    async def cancel(self, session_id: str) -> bool:
        return await self._call(CancelReply(session_id))

    async def hold_decode(self, session_id: str, held: bool) -> None:
        await self._call(HoldDecode(session_id, held))

    async def close(self, session_id: str) -> None:
        await self._call(CloseSession(session_id))

    async def held_tokens(self, session_id: str) -> list[int]:
        return await self._call(GetHeldTokens(session_id))

    async def restore_session(self, snapshot: SessionSnapshot) -> SessionInfo:
        """Rebuild a session from its snapshot (see EngineCore.restore_session)."""
        command = RestoreSession(
            snapshot.session_id, snapshot.tokens, snapshot.stream_pos, snapshot.open_reply
        )
        return await self._call(command)

    async def offload_session(self, session_id: str) -> SessionSnapshot:
        """Take an idle session off the device; its snapshot rebuilds it later."""
        return await self._call(OffloadSession(session_id))

    async def watch_snapshots(self, callback: Callable[[list[SessionSnapshot]], None]) -> None:
        """Have `callback` receive session snapshots (turn ends, long replies) once per flush."""
        self._on_snapshots = callback
        await self._call(WatchSnapshots())

    async def stats(self, max_wait_s: float = 0.5) -> EngineStats:
        """A fresh snapshot, or the last one if the engine is busy longer than `max_wait_s` (a
        long step must not make health checks and routing think the engine is gone)."""
        if self._pending_stats is None or self._pending_stats.done():
            self._pending_stats = asyncio.ensure_future(self._call(GetStats()))
            self._pending_stats.add_done_callback(self._keep_stats)
        if self._last_stats is None:
            return await asyncio.shield(self._pending_stats)
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(self._pending_stats), max_wait_s)
        return self._last_stats

    async def take_step_seconds(self) -> list[float]:
        """Step durations recorded since the last call (at most the last 4096), for histograms."""
        return await self._call(TakeStepSeconds())

    # -- from the transport, on the event loop's thread ---------------------------------------------
    def _on_reply(self, call_id: int, ok: bool, value: Any) -> None:
        future = self._calls.pop(call_id, None)
        if future is None or future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _on_events(self, batch: EventBatch, snapshots: list[SessionSnapshot]) -> None:
        if snapshots and self._on_snapshots is not None:
            self._on_snapshots(snapshots)
        for request_id, events in batch:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            for event in events:
                stream.push(event)
            if isinstance(events[-1], BaseException | TurnEndEvent):
                del self._streams[request_id]
            stream.wake()

    def _on_lost(self, error: EngineStoppedError) -> None:
        """The engine is gone: whoever still waits gets `error`."""
        if self._error is None:
            self._error = error
        for future in self._calls.values():
            if not future.done():
                future.set_exception(self._error)
        self._calls.clear()
        for stream in self._streams.values():
            stream.push(self._error)
            stream.wake()
        self._streams.clear()

    # -- plumbing ------------------------------------------------------------------------------------
    async def _call(self, command: Command) -> Any:
        if self._stopping or self._error is not None:
            raise EngineStoppedError("the engine is not running")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = future
        try:
            self._send(call_id, command)
        except OSError:
            self._calls.pop(call_id, None)
            raise EngineStoppedError("the engine process is gone") from None
        return await future

    def _keep_stats(self, future: asyncio.Future[EngineStats]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._last_stats = future.result()
