"""Admission follows the capacity to generate, not to hold (ReplicaSessions against a real tiny
engine, no store): a session in a conversation keeps its slot; with every slot in one, an Open is
refused at once with a retry hint, and a turn that needs a rebuild waits its turn in line."""

from __future__ import annotations

import asyncio
import time

import pytest

import deployments.replica_sessions as replica_sessions
from deployments.replica_sessions import ReplicaSessions
from deployments.settings import AppSettings
from sinkcache.config import CacheGeometry
from sinkcache.errors import ArenaFullError
from sinkwire.status import retry_after_s
from tests.tiny_engine import make_engine, tiny_models

SLOTS = 2


@pytest.fixture(scope="module")
def model():
    return tiny_models()[1]


@pytest.fixture
async def sessions(model):
    engine = make_engine(model, CacheGeometry(2, 10), slots=SLOTS)
    settings = AppSettings.from_args(
        {"model": "tiny", "sink": 2, "window": 10, "resume_secret": "s" * 44}
    )
    sessions = ReplicaSessions(engine, "r0", settings)
    await sessions.start()
    yield sessions
    await engine.shutdown()


async def _conversing(sessions: ReplicaSessions) -> str:
    """A session with a stream whose turn just ended: in a conversation."""
    session_id = (await sessions.open()).info.session_id
    sessions.attach(session_id, asyncio.Queue())
    await sessions.before_append(session_id)
    sessions.turn_ended(session_id)
    return session_id


async def test_conversing_sessions_keep_their_slots_and_an_open_is_refused_with_a_hint(
    sessions: ReplicaSessions,
) -> None:
    talking = [await _conversing(sessions) for _ in range(SLOTS)]
    started = time.monotonic()
    with pytest.raises(ArenaFullError) as refused:
        await sessions.open()
    assert time.monotonic() - started < 2  # at once, not after a wait
    hint = retry_after_s(str(refused.value))
    assert hint is not None and 1 <= hint <= replica_sessions.CONVERSING_S, refused.value
    assert all(sessions.entries[s].resident for s in talking)  # nobody was evicted for it

    # A pause longer than CONVERSING_S ends a conversation: that session makes room.
    sessions.entries[talking[0]].turn_ended_at -= replica_sessions.CONVERSING_S + 1
    newcomer = (await sessions.open()).info.session_id
    assert not sessions.entries[talking[0]].resident
    assert sessions.entries[newcomer].resident and sessions.entries[talking[1]].resident


async def test_idle_sessions_without_a_turn_or_a_stream_still_make_room(
    sessions: ReplicaSessions,
) -> None:
    """Holding more sessions than slots still works for sessions that are not generating."""
    held = [(await sessions.open()).info.session_id for _ in range(3 * SLOTS)]
    assert sum(sessions.entries[s].resident for s in held) == SLOTS
    assert sessions.offloaded == 2 * SLOTS


async def test_a_turn_that_needs_a_rebuild_waits_in_line_then_gets_the_slot(
    sessions: ReplicaSessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica_sessions, "CONVERSING_S", 1.0)
    away = (await sessions.open()).info.session_id
    assert await sessions._offload(sessions.entries[away])
    talking = [await _conversing(sessions) for _ in range(SLOTS)]
    sessions.attach(away, asyncio.Queue())

    waiting = asyncio.create_task(sessions.before_append(away))  # its rebuild needs a slot
    deadline = time.monotonic() + 10  # a cap: the first try for a slot comes at once
    while not sessions._line_stuck:  # it tried, found every slot conversing, and waits in line
        assert not waiting.done(), "the rebuild did not wait although no slot was free"
        assert time.monotonic() < deadline, "the rebuild never reported waiting for a slot"
        await asyncio.sleep(0.01)
    with pytest.raises(ArenaFullError, match="wait for a slot"):  # first come, first served
        await sessions.open()
    await asyncio.wait_for(waiting, 10)  # a pause of CONVERSING_S frees a slot: it is rebuilt
    assert sessions.entries[away].resident
    assert sum(sessions.entries[s].resident for s in talking) == SLOTS - 1


async def test_a_full_line_or_a_long_wait_is_refused_with_a_hint(
    sessions: ReplicaSessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica_sessions, "REBUILD_WAIT_S", 0.5)
    away = (await sessions.open()).info.session_id
    assert await sessions._offload(sessions.entries[away])
    for _ in range(SLOTS):
        await _conversing(sessions)
    sessions.attach(away, asyncio.Queue())
    with pytest.raises(ArenaFullError) as refused:
        await sessions.before_append(away)
    assert retry_after_s(str(refused.value)) is not None, refused.value
    assert sessions.entries[away].inflight == 0 and not sessions.entries[away].resident

    monkeypatch.setattr(replica_sessions, "MAX_QUEUED_REBUILDS", 0)
    started = time.monotonic()
    with pytest.raises(ArenaFullError, match="retry in"):
        await sessions.before_append(away)
    assert time.monotonic() - started < 0.4  # refused at once, not after the wait
