"""EngineCore: sessions, the step loop's body, and what each step's outputs mean.

Single-threaded by design: only the engine thread (sinkcache.async_engine) calls it. One `step()`
plans step k, launches it, and only then reads step k-1's outputs, so the host's bookkeeping
overlaps the device's work. The price is that a reply which ends (EOS, stop string) is noticed one
step late; the extra token that step produced is dropped, and because a decode step writes the
token it *feeds* (not the one it produces), the cache still holds exactly the emitted stream.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from sinkcache.arena import KVArena
from sinkcache.inputs import CHAT_ROLES, AppendInput, ChatTurn, TextInput, TokenInput
from sinkcache.runner import ModelRunner, StepResult
from sinkcache.sampling import GenerationParams, SamplerVariant, SamplingError
from sinkcache.scheduler import Scheduler, StepRecord
from sinkcache.session import (
    EndReason,
    InvalidRequestError,
    Request,
    ScoresEvent,
    Session,
    SessionExistsError,
    SessionNotFoundError,
    SessionState,
    TokensEvent,
    TurnEndEvent,
)

log = logging.getLogger(__name__)

MAX_APPEND_TOKENS = 1 << 22


class OutputSink(Protocol):
    """Where a request's events go (sinkcache.async_engine.RequestStream implements it)."""

    def push(self, event: Any) -> None: ...

    def fail(self, error: BaseException) -> None: ...


class _Discard:
    """A sink that drops events (warm-up requests)."""

    def push(self, event: Any) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass


class TextCodec(Protocol):
    """Tokenizer-side services the engine needs (sinkcache.text.TokenizerCodec implements it)."""

    vocab_size: int
    eos_ids: frozenset[int]

    def encode(
        self, item: AppendInput, first: bool, close_reply: str | None, reply: bool
    ) -> list[int]: ...

    def new_decoder(self) -> Any: ...


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
        self.codec = codec
        self.vocab_size = runner.model.shape.vocab_size
        self.eos_ids = codec.eos_ids if codec is not None else eos_ids
        self.scheduler = Scheduler(self.arena.geometry, prefill_budget)
        self.sessions: dict[str, Session] = {}
        self.counters = EngineCounters()
        self._inflight: tuple[StepRecord, StepResult, float] | None = None
        self.dirty: set[Any] = set()  # sinks with new events since the last flush
        self._unsent: set[Request] = set()  # requests holding reply tokens not yet sent

    # -- sessions ----------------------------------------------------------------------------------
    def open_session(self, session_id: str, stream_base: int = 0) -> Session:
        if session_id in self.sessions:
            raise SessionExistsError(f"session {session_id!r} already exists")
        slot = self.arena.allocate(base=stream_base)
        session = Session(session_id, slot, stream_base=stream_base)
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
        """Queue an append; it runs after the session's earlier requests.

        `max_chunk` caps the prefill chunk (1 feeds a token per step, as the paper's evaluation).
        """
        session = self.session(session_id)
        self._validate(item, generation)
        window = self.arena.geometry.window
        if max_chunk is not None and not 1 <= max_chunk <= window:
            raise InvalidRequestError(f"chunk must be in [1, {window}], got {max_chunk}")
        request = Request(
            max_chunk=max_chunk,
            tokens=[],
            generation=generation,
            score=score,
            sink=sink,
            input=item,
            chat=isinstance(item, ChatTurn),
        )
        session.queue.append(request)
        if session.active is None:
            self._activate(session)
        return request

    def cancel(self, session_id: str) -> bool:
        """Stop the session's current reply; its input stays in the stream. True if one ran."""
        session = self.session(session_id)
        request = session.active
        if request is None or request.generation is None or request.finished:
            return False
        request.cancelled = True
        return True

    def close(self, session_id: str) -> None:
        session = self.session(session_id)
        session.closing = True
        while session.queue:
            self._end(session.queue.popleft(), EndReason.CLOSED, session, generated=0)
        if session.active is not None and not session.active.finished:
            session.active.cancelled = True
            if session.state in (SessionState.IDLE, SessionState.PREFILL):
                self._finish(session, session.active, EndReason.CLOSED)
            return  # freed when the reply in flight drains
        self._release(session)

    def _release(self, session: Session) -> None:
        self.scheduler.drop(session)
        self.arena.release(session.slot)
        del self.sessions[session.session_id]
        self._notify_idle(session, closed=True)

    def when_idle(self, session_id: str, callback: Any) -> None:
        """Call `callback(session)` once the session has no request running or queued
        (`callback(None)` if it closes first)."""
        session = self.session(session_id)
        session.idle_waiters.append(callback)
        self._notify_idle(session)

    @staticmethod
    def _notify_idle(session: Session, closed: bool = False) -> None:
        if closed or (session.active is None and not session.queue):
            waiters, session.idle_waiters = session.idle_waiters, []
            for callback in waiters:
                callback(None if closed else session)

    def held_tokens(self, session_id: str) -> list[int]:
        """The ids a session's cache holds plus its pending tokens (to rebuild it elsewhere)."""
        session = self.session(session_id)
        return self.arena.held_token_ids(session.slot) + list(session.pending)

    # -- requests ----------------------------------------------------------------------------------
    def _validate(self, item: AppendInput, generation: GenerationParams | None) -> None:
        if isinstance(item, TokenInput):
            if len(item.ids) > MAX_APPEND_TOKENS:
                raise InvalidRequestError(f"append too long: {len(item.ids)} tokens")
            bad = [t for t in item.ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} out of range [0, {self.vocab_size})")
        elif isinstance(item, ChatTurn | TextInput):
            if self.codec is None:
                raise InvalidRequestError("this model has no tokenizer: append token ids")
            if isinstance(item, ChatTurn) and item.role not in CHAT_ROLES:
                raise InvalidRequestError(
                    f"unknown chat role {item.role!r} (use {', '.join(CHAT_ROLES)})"
                )
            text = item.text if isinstance(item, TextInput) else item.content
            if len(text) > 4 * MAX_APPEND_TOKENS:
                raise InvalidRequestError(f"append too long: {len(text)} characters")
        else:
            raise InvalidRequestError(f"unsupported append input {type(item).__name__}")
        if generation is not None:
            try:
                generation.validate(self.vocab_size)
            except SamplingError as error:
                raise InvalidRequestError(str(error)) from None
            if generation.stop and self.codec is None:
                raise InvalidRequestError("stop strings need a tokenizer")

    def _activate(self, session: Session) -> None:
        """Make the next queued request the active one and lay out what it feeds."""
        while session.queue and session.active is None:
            request = session.queue.popleft()
            try:
                tokens = self._encode(session, request)
            except Exception as error:  # a template that cannot render this turn, say
                request.sink.fail(InvalidRequestError(f"cannot encode append: {error}"))
                continue
            stream = session.pending + tokens
            if request.generation is not None and not stream:
                request.sink.fail(
                    InvalidRequestError("nothing to continue from: append some input")
                )
                continue
            session.pending = []
            request.tokens = tokens
            if request.generation is None:
                request.feed, session.pending = stream[:-1], stream[-1:]
                tail = session.pending
            else:
                request.feed, tail = stream, [-1]
                request.variant = SamplerVariant.for_params(request.generation)
                self.runner.sampler.configure(session.slot, request.generation)
                request.decoder = self.codec.new_decoder() if self.codec is not None else None
            if request.score:
                request.targets = request.feed[1:] + tail
            request.stream_start = session.stream_pos + len(request.feed)
            session.active = request
            if request.feed:
                self.scheduler.add_prefill(session)
            else:
                self._finish(session, request, EndReason.APPENDED)

    def _encode(self, session: Session, request: Request) -> list[int]:
        item = request.input
        first = session.stream_pos == 0
        if isinstance(item, TokenInput):
            session.open_reply = None
            return list(item.ids)
        close_reply = session.open_reply if request.chat else None
        session.open_reply = None
        return self.codec.encode(item, first, close_reply, request.generation is not None)

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
            self.submit(session_id, TokenInput(list(range(1, 9))), params, False, _Discard())
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
        """About how many sinks the next flush will wake."""
        return len(self._unsent) + len(self.dirty)

    @property
    def busy(self) -> bool:
        return self._inflight is not None or self.scheduler.has_work

    def _apply(self, record: StepRecord, result: StepResult, started: float) -> None:
        result.wait()
        counters = self.counters
        counters.steps += 1
        counters.step_seconds.append(time.perf_counter() - started)
        counters.decode_tokens += len(record.decode)
        counters.prefill_tokens += sum(c.length for c in record.chunks)
        for (session, request), token in zip(
            record.decode, result.decode_tokens.tolist(), strict=True
        ):
            if not request.finished:
                self._emit(session, request, token)
        sampled = iter(result.prefill_tokens.tolist())
        scores = result.scores
        offset = 0
        for chunk in record.chunks:
            request, session = chunk.request, chunk.session
            if chunk.score_entries:
                if not request.finished and chunk.valid_scores:
                    values = scores[offset : offset + chunk.valid_scores].tolist()
                    self._push(request, ScoresEvent(values, chunk.first_scored_pos))
                offset += chunk.score_entries
            if chunk.sample:
                token = next(sampled)
                if not request.finished:
                    self._emit(session, request, token)
            elif chunk.last and not request.finished:
                reason = EndReason.CANCELLED if request.generation else EndReason.APPENDED
                self._finish(session, request, reason)

    def _emit(self, session: Session, request: Request, token: int) -> None:
        """One reply token. Tokens collect in `request.unsent` and become one TokensEvent (text
        decoded for all of them at once) when events are flushed, so per-token host work is a few
        comparisons; a request with stop strings decodes every token to look for them."""
        request.emitted += 1
        request.last_token = token
        request.unsent.append(token)
        self.counters.generated_tokens += 1
        self._unsent.add(request)
        params = request.generation
        if token in self.eos_ids and not params.ignore_eos:
            self._finish(session, request, EndReason.EOS)
        elif params.stop and self._hit_stop(request, self._materialize(request)):
            self._finish(session, request, EndReason.STOP, detail=request.text_tail)
        elif request.emitted >= params.max_new_tokens:
            self._finish(session, request, EndReason.LENGTH)
        elif request.cancelled and request.emitted >= request.planned:
            self._finish(session, request, EndReason.CANCELLED)

    def _materialize(self, request: Request) -> str:
        """Turn a request's unsent reply tokens into one TokensEvent; returns its text."""
        ids, request.unsent = request.unsent, []
        self._unsent.discard(request)
        if not ids:
            return ""
        text = ""
        if request.decoder is not None:
            eos = ids[-1] in self.eos_ids and not request.generation.ignore_eos
            text = request.decoder.feed(ids[:-1] if eos else ids)  # EOS has no text
        request.sink.push(TokensEvent(ids, text, request.stream_start + request.emitted))
        self.dirty.add(request.sink)
        return text

    def take_dirty(self) -> set[Any]:
        """Sinks with new events since the last call (pending reply tokens become events now)."""
        for request in list(self._unsent):
            self._materialize(request)
        dirty, self.dirty = self.dirty, set()
        return dirty

    @staticmethod
    def _hit_stop(request: Request, text: str) -> bool:
        tail = request.text_tail + text
        for stop in request.generation.stop:
            if stop in tail:
                request.text_tail = stop
                return True
        longest = max(len(s) for s in request.generation.stop)
        request.text_tail = tail[-(longest - 1) :] if longest > 1 else ""
        return False

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
        session.state = SessionState.IDLE
        if session.closing:
            self._release(session)
        else:
            self._activate(session)
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
        self._push(
            request, TurnEndEvent(reason, len(request.tokens), generated, stream_pos, detail)
        )

    def _push(self, request: Request, event: Any) -> None:
        if request.unsent:  # keep events in order: reply tokens first
            self._materialize(request)
        request.sink.push(event)
        self.dirty.add(request.sink)
