"""The scheduler decides what one step runs.

Every generating session gets one decode row per step (continuous batching). Prefill chunks of at
most the window share a per-step prefill token budget, one chunk per session per step, round-robin:
decodes always run, a long append cannot stall anyone, and new turns are not starved by a large
decode batch (their first tokens wait for at most a few steps). Rebuilds of restored sessions
take at most REBUILD_SHARE of that budget per step, so that many sessions coming back at once slow
neither the steps of those generating nor the first tokens of their new turns much.
A session whose reader is behind can be held (`hold`): it keeps its place but gets no decode rows
until released, so an unread reply stops costing compute and memory (backpressure). A held reply
that is cancelled gets the one row that ends it, as any cancelled reply does.
The scheduler only plans, and owns the schedule's progress (session.cached and state, each
request's fed/planned/decode_steps); the engine applies what the step produced.
"""

from __future__ import annotations

from collections import deque

from sinkcache.config import CacheGeometry
from sinkcache.core.plan import ChunkRecord, PrefillChunk, StepPlan, StepRecord
from sinkcache.core.sampling import SamplerVariant
from sinkcache.core.session import Session, SessionState

REBUILD_SHARE = 0.25  # of each step's prefill budget, at most, for rebuilds


class Scheduler:
    def __init__(self, geometry: CacheGeometry, prefill_budget: int) -> None:
        self.geometry = geometry
        self.prefill_budget = prefill_budget
        self.decoding: dict[str, Session] = {}
        self.prefilling: deque[Session] = deque()
        self.held: dict[str, Session] = {}  # generating, but held: no decode rows
        self._decode_version = 0
        self._decode_slots: list[int] = []
        self._decode_sessions: list[Session] = []
        self._decode_dirty = True

    # -- membership --------------------------------------------------------------------------------
    def add_prefill(self, session: Session) -> None:
        session.state = SessionState.PREFILL
        self.prefilling.append(session)

    def _start_decode(self, session: Session) -> None:
        session.state = SessionState.DECODE
        if session.decode_held:
            self.held[session.session_id] = session
            return
        self.decoding[session.session_id] = session
        self._decode_dirty = True

    def hold(self, session: Session, held: bool) -> None:
        """Hold (True) or release (False) the session's decode rows; it lasts across turns."""
        session.decode_held = held
        session_id = session.session_id
        if held and session_id in self.decoding:
            self._stop_decode(session)
            self.held[session_id] = session
        elif not held and session_id in self.held:
            del self.held[session_id]
            self.decoding[session_id] = session
            self._decode_dirty = True

    def _stop_decode(self, session: Session) -> None:
        if self.decoding.pop(session.session_id, None) is not None:
            self._decode_dirty = True

    def drop(self, session: Session) -> None:
        """Forget a session's schedule (its turn ended or it closed): it is idle."""
        self._stop_decode(session)
        self.held.pop(session.session_id, None)
        if session in self.prefilling:
            self.prefilling.remove(session)
        session.state = SessionState.IDLE

    @property
    def has_work(self) -> bool:
        return bool(self.decoding or self.prefilling)

    # -- planning ----------------------------------------------------------------------------------
    def plan(self) -> StepRecord | None:
        record = StepRecord(StepPlan())
        variant = SamplerVariant.GREEDY
        ending = set()
        for session_id, session in list(self.held.items()):
            if session.active.cancelled:  # a held reply that must end gets the row that ends it
                del self.held[session_id]
                self.decoding[session_id] = session
                self._decode_dirty = True
                ending.add(session_id)
        for session in list(self.decoding.values()):
            request = session.active
            assert request is not None
            params = request.generation
            cancelled = request.cancelled and session.session_id not in ending
            if cancelled or request.planned >= params.max_new_tokens or request.finished:
                self._stop_decode(session)
                if not request.finished:
                    session.state = SessionState.DRAIN
        if self._decode_dirty:
            self._decode_sessions = list(self.decoding.values())
            self._decode_slots = [s.slot for s in self._decode_sessions]
            self._decode_version += 1
            self._decode_dirty = False
        for session in self._decode_sessions:
            request = session.active
            request.planned += 1
            request.decode_steps += 1
            session.cached += 1
            variant = max(variant, request.variant)
            record.decode.append((session, request))
        record.plan.decode_slots = self._decode_slots
        record.plan.decode_version = self._decode_version

        budget = self.prefill_budget
        rebuild_budget = max(1, int(self.prefill_budget * REBUILD_SHARE))
        rounds = len(self.prefilling)
        while self.prefilling and budget > 0 and rounds > 0:
            rounds -= 1
            session = self.prefilling.popleft()
            request = session.active
            if request.rebuild and rebuild_budget == 0:
                self.prefilling.append(session)  # the rebuilds' share of this step is spent
                continue
            limit = request.max_chunk or self.geometry.window
            if request.rebuild:
                limit = min(limit, rebuild_budget)
            n = min(len(request.feed) - request.fed, limit, budget)
            if request.rebuild:
                rebuild_budget -= n
            tokens = request.feed[request.fed : request.fed + n]
            last = request.fed + n == len(request.feed)
            sample = last and request.generation is not None and not request.cancelled
            # Scores: the known successor of each fed token (-1 after the last one of a reply).
            targets = request.targets[request.fed : request.fed + n] if request.targets else None
            record.chunks.append(
                ChunkRecord(
                    session,
                    request,
                    n,
                    sample,
                    score_entries=n if targets else 0,
                    valid_scores=sum(1 for t in targets if t >= 0) if targets else 0,
                    first_scored_pos=session.stream_base + session.cached + 1,
                    last=last,
                )
            )
            chunk = PrefillChunk(session.slot, tokens, session.cached, sample, targets)
            record.plan.prefill.append(chunk)
            session.cached += n
            request.fed += n
            budget -= n
            if sample:
                variant = max(variant, request.variant)
                request.planned = 1
                self._start_decode(session)
            elif last:
                session.state = SessionState.DRAIN
            else:
                self.prefilling.append(session)  # round-robin: back of the queue
        record.plan.variant = variant
        if not record.decode and not record.chunks:
            return None
        return record
