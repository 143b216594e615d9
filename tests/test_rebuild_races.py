"""A rebuild that meets a copy of its session already in the engine (a claim or a move cut short)
must not reach the client as ALREADY_EXISTS, a code outside the contract: restoring the snapshot
the engine's copy was restored from is a no-op, and a copy from another snapshot, which this
replica holds no entry for, is closed and the session rebuilt. A real engine (tiny random model
on CPU, on a thread) and a real SQLite store."""

from __future__ import annotations

from array import array
from pathlib import Path

import pytest

from deployments.replica_sessions import ReplicaSessions
from deployments.resume import resume_token
from deployments.settings import AppSettings
from deployments.store import SessionRecord, SqliteSessionStore
from sinkcache.config import CacheGeometry
from sinkcache.errors import SessionExistsError
from sinkcache.events import SessionSnapshot
from sinkcache.inputs import TokenInput
from tests.tiny_engine import collect, make_engine, tiny_models

SECRET = "test-secret-" + "r" * 32
SINK, WINDOW = 2, 10
SESSION_ID = "gone." + "b" * 32


@pytest.fixture(scope="module")
def model():
    return tiny_models()[1]


def snapshot(first_token: int, stream_pos: int = 40) -> SessionSnapshot:
    ids = array("i", range(first_token, first_token + 12)).tobytes()
    return SessionSnapshot(SESSION_ID, ids, stream_pos, None)


async def test_restoring_the_same_snapshot_twice_is_a_no_op(model) -> None:
    engine = make_engine(model, CacheGeometry(SINK, WINDOW))
    try:
        first = await engine.restore_session(snapshot(5))
        again = await engine.restore_session(snapshot(5))  # SessionExistsError on the old code
        assert again == first
        assert (await engine.stats()).sessions == 1
        assert (await engine.session_info(SESSION_ID, settled=True)).stream_pos == 40
        with pytest.raises(SessionExistsError):
            await engine.restore_session(snapshot(6))  # another snapshot
        with pytest.raises(SessionExistsError):
            await engine.restore_session(snapshot(5, stream_pos=41))
        _, _, end = await collect(await engine.append(SESSION_ID, TokenInput((7, 8))))
        assert end.stream_pos == 42
        with pytest.raises(SessionExistsError):  # the stream went on past the snapshot
            await engine.restore_session(snapshot(5))
    finally:
        await engine.shutdown()


def record(first_token: int) -> SessionRecord:
    return SessionRecord(
        session_id=SESSION_ID,
        tokens=tuple(range(first_token, first_token + 12)),
        stream_pos=40,
        open_reply=None,
        owner="",
        model="tiny",
        sink=SINK,
        window=WINDOW,
        epoch=0,
        replica_id="gone",
        updated_at=1_750_000_000.0,
    )


@pytest.mark.parametrize("orphan", ["the same snapshot", "an older snapshot"])
async def test_a_resume_rebuilds_over_an_engine_copy_the_replica_does_not_know(
    model, tmp_path: Path, orphan: str
) -> None:
    """Issue 19 defect 3: the copy left in the engine made the rebuild fail with
    SessionExistsError, which reached the client as ALREADY_EXISTS."""
    engine = make_engine(model, CacheGeometry(SINK, WINDOW))
    store = SqliteSessionStore(tmp_path / "sessions.db", ttl_s=60.0)
    settings = AppSettings.from_args(
        {"model": "tiny", "sink": SINK, "window": WINDOW, "resume_secret": SECRET}
    )
    sessions = ReplicaSessions(engine, "r0", settings, store)
    await sessions.start()
    try:
        await store.put_many([record(5)])
        await engine.restore_session(snapshot(5 if orphan == "the same snapshot" else 3))
        attached = await sessions.resume(SESSION_ID, resume_token(SECRET, SESSION_ID))
        assert attached.rebuilt and attached.info.stream_pos == 40
        assert (await engine.stats()).sessions == 1
        held = await engine.held_tokens(SESSION_ID)
        assert held == list(range(5, 17))  # the store's snapshot, not the orphan's
    finally:
        await sessions.writer.stop(timeout_s=5)
        await engine.shutdown()
        await store.close()
