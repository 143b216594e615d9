"""EngineCore: the session registry and the step, with intake, scheduler, runner and outputs
each doing its own part.

Single-threaded by design: only the engine loop's thread (sinkcache.host) calls it. One `step()`
plans step k, launches it, and only then reads step k-1's outputs, so the host's bookkeeping
overlaps the device's work. The price is that a reply which ends (EOS, stop string) is noticed one
step late; the extra token that step produced is dropped, and because a decode step writes the
token it *feeds* (not the one it produces), the cache still holds exactly the emitted stream.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sinkcache.core.arena import KVArena
from sinkcache.core.intake import RequestIntake, TextCodec
from sinkcache.core.outputs import OutputSink, ReplyOutputs
from sinkcache.core.plan import StepRecord
from sinkcache.core.runner import ModelRunner, StepResult
from sinkcache.core.scheduler import Scheduler
from sinkcache.core.session import Request, Session, SessionState, StreamTokens
from sinkcache.errors import InvalidRequestError, SessionExistsError, SessionNotFoundError
from sinkcache.events import EndReason, SessionSnapshot, TurnEndEvent
from sinkcache.inputs import AppendInput, GenerationParams, TokenInput

log = logging.getLogger(__name__)


def _restore_key(tokens: list[int], stream_pos: int, open_reply: int | None) -> tuple:
    try:
        return array("i", tokens).tobytes(), stream_pos, open_reply
    except OverflowError:  # not a snapshot any session was restored from
        return tuple(tokens), stream_pos, open_reply


class _Discard:
    """A sink that drops events (warm-up and rebuild requests): a host finds nothing to deliver."""

    events = ()

    def push(self, event: Any) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass


@dataclass
class EngineCounters:
    steps: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    turns_finished: int = 0
    step_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    def step_seconds_after(self, steps: int) -> list[float]:
        """Durations of the steps after the first `steps` (at most the last 4096 are kept)."""
        new = self.steps - steps
        return list(self.step_seconds)[-new:] if new > 0 else []


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        codec: TextCodec | None,
        prefill_budget: int,
        eos_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.runner = runner
        self.arena: KVArena = runner.arena
        geometry = self.arena.geometry
        self.scheduler = Scheduler(geometry, prefill_budget)
        self.intake = RequestIntake(
            codec, runner.model.shape.vocab_size, geometry.window, runner.sampler
        )
        self.outputs = ReplyOutputs(codec.eos_ids if codec is not None else eos_ids)
        self.sessions: dict[str, Session] = {}
        self.counters = EngineCounters()
        self._inflight: tuple[StepRecord, StepResult, float] | None = None
        # Snapshots for a session store: off until a host asks for them (watch_snapshots). One per
        # session is kept until taken, the newest.
        self._snapshots: dict[str, SessionSnapshot] | None = None
        self._snapshot_every = max(1, geometry.window // 2)  # reply tokens between snapshots
        # What each restored session was restored from (int32 bytes, stream position, chat
        # state), until anything else is submitted to it: a second restore of the same snapshot
        # is then a no-op (a host whose first restore was cut short retries it).
        self._restored_from: dict[str, tuple[bytes, int, int | None]] = {}

    # -- sessions ----------------------------------------------------------------------------------
    def open_session(self, session_id: str, stream_base: int = 0) -> Session:
        if session_id in self.sessions:
            raise SessionExistsError(f"session {session_id!r} already exists")
        slot = self.arena.allocate(base=stream_base)
        geometry = self.arena.geometry
        tokens = StreamTokens(geometry.sink, geometry.window)
        session = Session(session_id, slot, tokens, stream_base=stream_base)
        self.sessions[session_id] = session
        return session

    def session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.closing:
            raise SessionNotFoundError(f"session {session_id!r} not found")
        return session

    def submit(
        self,
        session_id: str,
        item: AppendInput,
        generation: GenerationParams | None,
        score: bool,
        sink: OutputSink,
        max_chunk: int | None = None,
    ) -> Request:
        """Queue an append; it runs after the session's earlier requests. Validation errors raise
        here, before anything is queued."""
        session = self.session(session_id)
        request = self.intake.new_request(item, generation, score, sink, max_chunk)
        self._restored_from.pop(session_id, None)  # the stream goes on past its snapshot
        session.queue.append(request)
        if session.active is None:
            self._advance(session)
        return request

    def cancel(self, session_id: str) -> bool:
        """Stop the session's current reply; its input stays in the stream. True if one ran."""
        session = self.session(session_id)
        request = session.active
        if request is None or request.generation is None or request.finished:
            return False
        request.cancelled = True
        self.scheduler.recheck(session)
        return True

    def hold_decode(self, session_id: str, held: bool) -> None:
        """Stop (True) or restart (False) generating for the session, whose reader is behind;
        its place, its reply and its queue are kept. Cancel and close still end a held reply."""
        self.scheduler.hold(self.session(session_id), held)

    def close(self, session_id: str) -> None:
        session = self.session(session_id)
        session.closing = True
        while session.queue:
            self._end(session.queue.popleft(), EndReason.CLOSED, session, generated=0)
        if session.active is not None and not session.active.finished:
            session.active.cancelled = True
            self.scheduler.recheck(session)
            if session.state in (SessionState.IDLE, SessionState.PREFILL):
                self._finish(session, session.active, EndReason.CLOSED)
            return  # freed when the reply in flight drains
        self._release(session)

    def when_idle(self, session_id: str, callback: Any) -> None:
        """Call `callback(session)` once the session has no request running or queued
        (`callback(None)` if it closes first)."""
        session = self.session(session_id)
        session.idle_waiters.append(callback)
        self._notify_idle(session)

    def held_tokens(self, session_id: str) -> list[int]:
        """The ids the session's cache holds, then its pending tokens: what a fresh session must
        be fed to rebuild it elsewhere."""
        session = self.session(session_id)
        if session.active is not None:
            self.outputs.settle(session.active)  # its reply tokens so far join the stream
        return session.tokens.held(len(session.pending))

    def restore_session(
        self, session_id: str, tokens: list[int], stream_pos: int, open_reply: int | None
    ) -> Session:
        """Rebuild a session from a snapshot: a fresh slot fed `tokens` (one chunked prefill, no
        reply), its stream position continuing at `stream_pos`. The cache is then exactly what a
        fresh session fed those ids holds (the recomputation oracle's), not the lost cache, whose
        window keys had attended to tokens since evicted. Appends may follow at once; they run
        after the rebuild. Restoring a session it holds from the very snapshot it was restored
        from (nothing submitted since) returns it as it is; any other restore of a held session
        raises SessionExistsError."""
        held = self.sessions.get(session_id)
        restored_from = self._restored_from.get(session_id)
        if (
            held is not None
            and not held.closing
            and restored_from is not None
            and restored_from == _restore_key(tokens, stream_pos, open_reply)
        ):
            return held
        if not 0 <= len(tokens) <= stream_pos:
            raise InvalidRequestError(
                f"a snapshot of {len(tokens)} tokens cannot end at stream position {stream_pos}"
            )
        capacity = self.arena.geometry.capacity
        if len(tokens) > capacity + 1:
            raise InvalidRequestError(
                f"a snapshot holds at most {capacity + 1} tokens here, got {len(tokens)}"
            )
        session = self.open_session(session_id, stream_base=stream_pos - len(tokens))
        if tokens:
            request = self.submit(session_id, TokenInput(tuple(tokens)), None, False, _Discard())
            request.rebuild = True  # its chunks take at most a share of each step's prefill
        session.open_reply = open_reply
        self._restored_from[session_id] = _restore_key(tokens, stream_pos, open_reply)
        return session

    def offload_session(self, session_id: str) -> SessionSnapshot:
        """Take an idle session off the device: its snapshot, and its slot freed."""
        session = self.session(session_id)
        if session.active is not None or session.queue:
            raise InvalidRequestError(f"session {session_id!r} is busy")
        snapshot = self._snapshot(session, len(session.pending), session.stream_pos)
        if self._snapshots is not None:
            self._snapshots.pop(session_id, None)
        self._release(session)
        return snapshot

    def watch_snapshots(self) -> None:
        """From now on, snapshot every session at each turn end and every window/2 reply tokens;
        the host takes them with `take_snapshots` (for a session store)."""
        if self._snapshots is None:
            self._snapshots = {}

    def take_snapshots(self) -> list[SessionSnapshot]:
        if not self._snapshots:
            return []
        snapshots, self._snapshots = list(self._snapshots.values()), {}
        return snapshots

    @staticmethod
    def _snapshot(session: Session, pending: int, stream_pos: int) -> SessionSnapshot:
        tokens = array("i", session.tokens.held(pending)).tobytes()
        return SessionSnapshot(session.session_id, tokens, stream_pos, session.open_reply)

    def fail_all(self, error: BaseException) -> None:
        """Fail every running and queued request (the loop is going down)."""
        for session in self.sessions.values():
            for request in ([session.active] if session.active else []) + list(session.queue):
                self.outputs.fail(request, error)

    def warm_up(self) -> None:
        """Compile every kernel and capture every CUDA graph before serving: one short reply per
        sampler variant (prefill, eager and graph decode), then all decode graphs. Leaves no
        session, event or count behind."""
        variants = (
            GenerationParams(max_new_tokens=3, temperature=0.0, ignore_eos=True),
            GenerationParams(max_new_tokens=3, temperature=0.8, ignore_eos=True, seed=0),
            GenerationParams(max_new_tokens=3, temperature=0.8, top_p=0.9, ignore_eos=True, seed=0),
        )
        for i, params in enumerate(variants):
            session_id = f"warm-up-{i}"
            self.open_session(session_id)
            self.submit(session_id, TokenInput(tuple(range(1, 9))), params, False, _Discard())
            while self.busy:
                self.step()
            self.close(session_id)
        self.runner.capture_graphs()
        self.take_dirty()
        self.counters = EngineCounters()

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> bool:
        """Plan and launch one step, then apply the previous step's outputs. False if idle."""
        record = self.scheduler.plan()
        launched = None
        if record is not None:
            result = self.runner.execute(record.plan)
            launched = (record, result, time.perf_counter())
        if self._inflight is not None:
            self._apply(*self._inflight)
        self._inflight = launched
        return launched is not None

    def drain(self) -> None:
        """Apply outputs still in flight (when stopping)."""
        if self._inflight is not None:
            self._apply(*self._inflight)
            self._inflight = None

    @property
    def pending_sinks(self) -> int:
        return self.outputs.pending_sinks

    @property
    def busy(self) -> bool:
        return self._inflight is not None or self.scheduler.has_work

    def take_dirty(self) -> set[Any]:
        """Sinks with new events since the last call, for the host to deliver."""
        return self.outputs.take_dirty()

    def _apply(self, record: StepRecord, result: StepResult, started: float) -> None:
        result.wait()
        counters = self.counters
        counters.steps += 1
        counters.step_seconds.append(time.perf_counter() - started)
        counters.decode_tokens += len(record.decode)
        counters.prefill_tokens += sum(c.length for c in record.chunks)
        self._take_decode_tokens(record.decode, result.decode_tokens.tolist())
        sampled = iter(result.prefill_tokens.tolist())
        scores = result.scores
        offset = 0
        for chunk in record.chunks:
            request, session = chunk.request, chunk.session
            if chunk.score_entries:
                if not request.finished and chunk.valid_scores:
                    values = scores[offset : offset + chunk.valid_scores].tolist()
                    self.outputs.scores(request, values, chunk.first_scored_pos)
                offset += chunk.score_entries
            if chunk.sample:
                token = next(sampled)
                if not request.finished:
                    self._take_token(session, request, token)
            elif chunk.last and not request.finished:
                reason = EndReason.CANCELLED if request.generation else EndReason.APPENDED
                self._finish(session, request, reason)

    def _take_decode_tokens(self, rows: list[tuple[Session, Request]], tokens: list[int]) -> None:
        """One token per decode row, taken in one pass; then, in row order, the replies that end
        are finished and the mid-reply snapshots taken (each touches its own session only)."""
        every = self._snapshot_every if self._snapshots is not None else 0
        taken, noted = self.outputs.tokens(rows, tokens, every)
        self.counters.generated_tokens += taken
        for session, request, ended in noted:
            if ended is not None:
                self._finish(session, request, *ended)
            else:  # mid-reply, as in _take_token
                self.outputs.settle(request)
                stream_pos = request.stream_start + request.emitted
                self._snapshots[session.session_id] = self._snapshot(session, 1, stream_pos)

    def _take_token(self, session: Session, request: Request, token: int) -> None:
        self.counters.generated_tokens += 1
        ended = self.outputs.token(session, request, token)
        if ended is not None:
            self._finish(session, request, *ended)
        elif self._snapshots is not None and request.emitted % self._snapshot_every == 0:
            # Mid-reply: the stream is the input and the reply so far; the newest reply token is
            # not written yet, so a rebuild keeps it pending.
            self.outputs.settle(request)
            stream_pos = request.stream_start + request.emitted
            self._snapshots[session.session_id] = self._snapshot(session, 1, stream_pos)

    # -- requests ending and starting --------------------------------------------------------------
    def _advance(self, session: Session) -> None:
        """Make the next queued request the active one (ending at once those with nothing to run)."""
        while session.queue and session.active is None:
            request = session.queue.popleft()
            try:
                self.intake.lay_out(session, request)
            except InvalidRequestError as error:
                request.finished = True
                self.outputs.fail(request, error)
                continue
            session.active = request
            if request.feed:
                self.scheduler.add_prefill(session)
            else:
                self._finish(session, request, EndReason.APPENDED)

    def _finish(
        self, session: Session, request: Request, reason: EndReason, detail: str = ""
    ) -> None:
        """End the active request; the session moves on to its next queued request."""
        generated = request.emitted
        if request.generation is not None:
            # Reply token i is written by decode step i; one produced but never fed stays pending.
            if generated and generated == request.decode_steps + 1:
                session.pending = [request.last_token]
            session.open_reply = request.last_token if reason == EndReason.EOS else -1
        self._end(request, reason, session, generated, detail)
        self.scheduler.drop(session)
        session.active = None
        if self._snapshots is not None and not session.closing:
            # Before the next queued request joins the stream: the turn's end, exactly.
            snapshot = self._snapshot(session, len(session.pending), session.stream_pos)
            self._snapshots[session.session_id] = snapshot
        if session.closing:
            self._release(session)
        else:
            self._advance(session)
            self._notify_idle(session)

    def _end(
        self,
        request: Request,
        reason: EndReason,
        session: Session,
        generated: int,
        detail: str = "",
    ) -> None:
        request.finished = True
        self.counters.turns_finished += 1
        stream_pos = (request.stream_start or session.stream_pos) + generated
        event = TurnEndEvent(reason, len(request.tokens), generated, stream_pos, detail)
        self.outputs.end(request, event)

    def _release(self, session: Session) -> None:
        self._restored_from.pop(session.session_id, None)
        if self._snapshots is not None:
            self._snapshots.pop(session.session_id, None)
        self.scheduler.drop(session)
        self.arena.release(session.slot)
        del self.sessions[session.session_id]
        self._notify_idle(session, closed=True)

    @staticmethod
    def _notify_idle(session: Session, closed: bool = False) -> None:
        if closed or (session.active is None and not session.queue):
            waiters, session.idle_waiters = session.idle_waiters, []
            for callback in waiters:
                callback(None if closed else session)
