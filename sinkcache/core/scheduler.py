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
from sinkcache.core.session import Request, Session, SessionState

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
        self._decode_rows: list[tuple[Session, Request]] = []  # shared by records: never mutated
        # Kept with `decoding`, in its order, so a changed batch is two list copies in C.
        self._rows: dict[str, tuple[Session, Request]] = {}
        self._slots: dict[str, int] = {}
        self._variants = [0] * len(SamplerVariant)  # decoding requests per sampler variant
        self._decode_dirty = True
        # When to look at a decoding session again (plan number -> sessions): once its reply has
        # been planned in full, or at the next plan after it was cancelled. So a step looks at the
        # sessions that may stop, not at every generating one.
        self._plans = 0
        self._due: dict[int, list[Session]] = {}

    # -- membership --------------------------------------------------------------------------------
    def add_prefill(self, session: Session) -> None:
        session.state = SessionState.PREFILL
        self.prefilling.append(session)

    def _start_decode(self, session: Session) -> None:
        session.state = SessionState.DECODE
        if session.decode_held:
            self.held[session.session_id] = session
            return
        self._join_decode(session)

    def _join_decode(self, session: Session) -> None:
        session_id, request = session.session_id, session.active
        self.decoding[session_id] = session
        self._rows[session_id] = (session, request)
        self._slots[session_id] = session.slot
        self._variants[request.variant] += 1
        self._decode_dirty = True
        left = max(0, request.generation.max_new_tokens - request.planned)
        self._due.setdefault(self._plans + 1 + left, []).append(session)

    def recheck(self, session: Session) -> None:
        """The session's reply was cancelled: look at it in the next plan."""
        self._due.setdefault(self._plans + 1, []).append(session)

    def hold(self, session: Session, held: bool) -> None:
        """Hold (True) or release (False) the session's decode rows; it lasts across turns."""
        session.decode_held = held
        session_id = session.session_id
        if held and session_id in self.decoding:
            self._stop_decode(session)
            self.held[session_id] = session
        elif not held and session_id in self.held:
            del self.held[session_id]
            self._join_decode(session)

    def _stop_decode(self, session: Session) -> None:
        if self.decoding.pop(session.session_id, None) is not None:
            _, request = self._rows.pop(session.session_id)
            del self._slots[session.session_id]
            self._variants[request.variant] -= 1
            self._decode_dirty = True

    def drop(self, session: Session) -> None:
        """Forget a session's schedule (its turn ended or it closed): it is idle."""
        self._stop_decode(session)
        self.held.pop(session.session_id, None)
        if session.state is SessionState.PREFILL and session in self.prefilling:
            self.prefilling.remove(session)  # only sessions in PREFILL are queued there
        session.state = SessionState.IDLE

    def _check_stop(self, session: Session, ending: bool) -> None:
        """Stop planning rows for a reply planned in full, cancelled (unless `ending`: a held
        reply's cancel gets one row) or finished."""
        request = session.active
        cancelled = request.cancelled and not ending
        if cancelled or request.planned >= request.generation.max_new_tokens or request.finished:
            self._stop_decode(session)
            if not request.finished:
                session.state = SessionState.DRAIN

    @property
    def has_work(self) -> bool:
        return bool(self.decoding or self.prefilling)

    # -- planning ----------------------------------------------------------------------------------
    def plan(self) -> StepRecord | None:
        record = StepRecord(StepPlan())
        variant = SamplerVariant.GREEDY
        self._plans += 1
        ending = set()
        for session_id, session in list(self.held.items()):
            if session.active.cancelled:  # a held reply that must end gets the row that ends it
                del self.held[session_id]
                self._join_decode(session)
                self.recheck(session)  # its cancel stops it in the next plan
                ending.add(session_id)
                self._check_stop(session, ending=True)
        for session in self._due.pop(self._plans, ()):
            session_id = session.session_id
            if self.decoding.get(session_id) is session and session_id not in ending:
                self._check_stop(session, ending=False)
        if self._decode_dirty:
            self._decode_rows = list(self._rows.values())
            self._decode_slots = list(self._slots.values())
            self._decode_version += 1
            self._decode_dirty = False
        for session, request in self._decode_rows:
            request.planned += 1
            request.decode_steps += 1
            session.cached += 1
        for row_variant in reversed(SamplerVariant):
            if self._variants[row_variant]:
                variant = max(variant, row_variant)
                break
        record.decode = self._decode_rows
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
