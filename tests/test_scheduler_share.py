"""Rebuilds of restored sessions take a bounded share of each step's prefill budget: many sessions
coming back at once neither lengthen the steps of those generating much nor hold back the first
tokens of their new turns (an oversubscribed service otherwise spends its steps re-prefilling)."""

from __future__ import annotations

from sinkcache.config import CacheGeometry
from sinkcache.core.scheduler import REBUILD_SHARE, Scheduler
from sinkcache.core.session import Request, Session, StreamTokens
from sinkcache.inputs import GenerationParams, TokenInput

GEOMETRY = CacheGeometry(4, 252)
BUDGET = 512


def _prefilling(scheduler: Scheduler, session_id: str, slot: int, tokens: int, rebuild: bool):
    """A session whose active request feeds `tokens` ids: a rebuild (no reply) or a new turn."""
    generation = None if rebuild else GenerationParams(max_new_tokens=4)
    request = Request(TokenInput(tuple(range(1, tokens + 1))), generation, False, None)
    request.rebuild = rebuild
    request.feed = list(range(1, tokens + 1))
    session = Session(session_id, slot, StreamTokens(GEOMETRY.sink, GEOMETRY.window))
    session.active = request
    scheduler.add_prefill(session)
    return session


def _fed(record, rebuild: bool) -> int:
    return sum(c.length for c in record.chunks if c.request.rebuild == rebuild)


def test_rebuilds_take_at_most_their_share_and_new_turns_the_rest() -> None:
    scheduler = Scheduler(GEOMETRY, prefill_budget=BUDGET)
    for i in range(6):  # six sessions coming back at once, a full window each
        _prefilling(scheduler, f"rebuild{i}", i, GEOMETRY.capacity, rebuild=True)
    _prefilling(scheduler, "turn", 10, 40, rebuild=False)
    share = int(BUDGET * REBUILD_SHARE)

    first = scheduler.plan()
    assert _fed(first, rebuild=True) == share
    assert _fed(first, rebuild=False) == 40  # the new turn is fed whole, in the same step

    steps, fed = 1, _fed(first, rebuild=True)
    while scheduler.prefilling:  # the rest of the rebuilds: the share every step, no more
        record = scheduler.plan()
        steps += 1
        assert _fed(record, rebuild=True) <= share
        fed += _fed(record, rebuild=True)
    assert fed == 6 * GEOMETRY.capacity  # all of them, in order, nothing skipped
    assert steps == -(-6 * GEOMETRY.capacity // share)


def test_a_rebuild_alone_still_progresses_every_step() -> None:
    scheduler = Scheduler(GEOMETRY, prefill_budget=BUDGET)
    _prefilling(scheduler, "rebuild", 0, GEOMETRY.capacity, rebuild=True)
    record = scheduler.plan()
    assert _fed(record, rebuild=True) == min(GEOMETRY.capacity, int(BUDGET * REBUILD_SHARE))
