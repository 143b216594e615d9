"""The engine loop's side of every host: the loop that steps an EngineCore, and what each command
does to the core (`LoopCommands`), written once so an engine on a thread and one in a child process
behave alike. A host only moves commands and replies in, and batches of request events out.

The loop runs posted commands, steps, and now and then hands the sinks with new events to `deliver`:
at most every `flush_interval` seconds, and under load less often, so that the events sent per
second stay near `max_events_per_s` (each event is a message to a client, and Python pays per
message, not per token). Only the loop's thread touches the core.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import threading
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

from sinkcache.core.engine import EngineCore
from sinkcache.core.session import Session
from sinkcache.errors import EngineError, EngineStoppedError, SessionNotFoundError
from sinkcache.events import SessionSnapshot
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
    Reply,
    RestoreSession,
    Submit,
    TakeStepSeconds,
    WatchSnapshots,
)
from sinkcache.host.protocol import EngineStats, SessionInfo

log = logging.getLogger(__name__)


class EngineLoop:
    """Steps the core until stopped; commands are closures run between steps."""

    def __init__(
        self,
        core: EngineCore,
        deliver: Callable[[set[Any], list[SessionSnapshot]], None],
        flush_interval: float = 0.005,
        max_events_per_s: float = 5000.0,
    ) -> None:
        self.core = core
        self.deliver = deliver
        self.flush_interval = flush_interval
        self.max_events_per_s = max_events_per_s
        self.commands: deque[Callable[[], None]] = deque()
        self.wakeup = threading.Event()
        self.stopping = False
        self.error: BaseException | None = None
        self._last_flush = 0.0

    def post(self, command: Callable[[], None]) -> None:
        """Run `command` on the loop's thread before its next step (callable from any thread)."""
        self.commands.append(command)
        self.wakeup.set()

    def stop(self) -> None:
        self.stopping = True
        self.wakeup.set()

    def run(self) -> None:
        core = self.core
        try:
            while not self.stopping:
                while self.commands:
                    self.commands.popleft()()
                worked = core.step()
                pending = core.pending_sinks
                if pending:
                    now = time.perf_counter()
                    interval = max(self.flush_interval, pending / self.max_events_per_s)
                    if not worked or now - self._last_flush >= interval:
                        self._flush(now)
                if not worked and not core.busy and not self.commands:
                    self.wakeup.wait(timeout=0.05)
                    self.wakeup.clear()
            core.drain()
        except BaseException as error:
            log.exception("engine loop failed")
            self.error = error
            core.fail_all(EngineStoppedError(f"engine failed: {error}"))
        finally:
            self._flush(time.perf_counter())
            while self.commands:  # answer whoever is still waiting
                self.commands.popleft()()

    def _flush(self, now: float) -> None:
        self._last_flush = now
        sinks = self.core.take_dirty()
        snapshots = self.core.take_snapshots()
        if sinks or snapshots:
            self.deliver(sinks, snapshots)


class Outbox:
    """A request's events on the loop side, collected until the next flush."""

    __slots__ = ("events", "request_id")

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.events: list[Any] = []

    def push(self, event: Any) -> None:
        self.events.append(event)

    def fail(self, error: BaseException) -> None:
        self.events.append(portable(error))


def portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling (ours do), else an EngineError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return EngineError(f"{type(error).__name__}: {error}")
    return error


def take_events(outboxes: set[Outbox]) -> EventBatch:
    """The new events of every outbox in `outboxes`, emptying them (one batch per flush)."""
    batch = []
    for outbox in outboxes:
        if outbox.events:
            batch.append((outbox.request_id, outbox.events))
            outbox.events = []
    return batch


def session_info(core: EngineCore, session: Session) -> SessionInfo:
    geometry = core.arena.geometry
    return SessionInfo(
        session.session_id,
        session.slot,
        geometry.capacity,
        geometry.sink,
        geometry.window,
        session.stream_pos,
    )


def engine_stats(core: EngineCore, engine_rss_bytes: int, engine_pid: int) -> EngineStats:
    arena, counters = core.arena, core.counters
    recent = sorted(list(counters.step_seconds)[-256:])
    return EngineStats(
        sessions=len(core.sessions),
        slots_total=arena.num_slots,
        slots_used=arena.used_slots,
        slots_free=arena.free_slots,
        decoding=len(core.scheduler.decoding),
        decode_held=len(core.scheduler.held),
        prefill_queue=len(core.scheduler.prefilling),
        steps=counters.steps,
        decode_tokens=counters.decode_tokens,
        prefill_tokens=counters.prefill_tokens,
        generated_tokens=counters.generated_tokens,
        turns_finished=counters.turns_finished,
        step_ms_p50=1000 * recent[len(recent) // 2] if recent else 0.0,
        kv_bytes=arena.nbytes(),
        device=str(arena.device),
        engine_rss_bytes=engine_rss_bytes,
        engine_pid=engine_pid,
    )


class LoopCommands:
    """Runs commands against the core; called on the engine loop's thread only."""

    def __init__(
        self,
        core: EngineCore,
        engine_rss_bytes: Callable[[], int] = lambda: 0,
        engine_pid: int = 0,
    ) -> None:
        """`engine_rss_bytes` and `engine_pid` describe the engine's own process, if it has one."""
        self.core = core
        self._engine_rss_bytes = engine_rss_bytes
        self._engine_pid = engine_pid
        self._steps_taken = 0

    def run(self, command: Command, reply: Reply) -> None:
        """Run one command and answer through `reply` (now, or later for a settled session)."""
        try:
            if isinstance(command, GetSessionInfo) and command.settled:
                self._reply_when_settled(command.session_id, reply)
                return
            value = self._execute(command)
        except BaseException as error:  # the caller's to handle
            reply(False, portable(error))
        else:
            reply(True, value)

    def _execute(self, command: Command) -> Any:
        core = self.core
        match command:
            case OpenSession(session_id, stream_base):
                session = core.open_session(session_id or uuid.uuid4().hex, stream_base)
                return session_info(core, session)
            case GetSessionInfo(session_id):
                return session_info(core, core.session(session_id))
            case Submit(request_id, session_id, item, generation, score, max_chunk):
                core.submit(session_id, item, generation, score, Outbox(request_id), max_chunk)
                return None
            case CancelReply(session_id):
                return core.cancel(session_id)
            case HoldDecode(session_id, held):
                return core.hold_decode(session_id, held)
            case CloseSession(session_id):
                return core.close(session_id)
            case GetHeldTokens(session_id):
                return core.held_tokens(session_id)
            case RestoreSession(session_id, tokens, stream_pos, open_reply):
                ids = array("i")
                ids.frombytes(tokens)
                session = core.restore_session(session_id, ids.tolist(), stream_pos, open_reply)
                # Where the stream stands once the rebuild (queued now) has run.
                return dataclasses.replace(session_info(core, session), stream_pos=stream_pos)
            case OffloadSession(session_id):
                return core.offload_session(session_id)
            case WatchSnapshots():
                return core.watch_snapshots()
            case GetStats():
                return engine_stats(core, self._engine_rss_bytes(), self._engine_pid)
            case TakeStepSeconds():
                samples = core.counters.step_seconds_after(self._steps_taken)
                self._steps_taken = core.counters.steps
                return samples
        raise TypeError(f"unknown engine command {type(command).__name__}")

    def _reply_when_settled(self, session_id: str, reply: Reply) -> None:
        core = self.core

        def on_idle(session: Session | None) -> None:
            if session is None:
                reply(False, SessionNotFoundError(f"session {session_id!r} was closed"))
            else:
                reply(True, session_info(core, session))

        core.when_idle(session_id, on_idle)
