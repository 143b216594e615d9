"""ReplicaSessions against a real engine (tiny random model on CPU) and a real SQLite store: what
the replica believes its engine holds stays true when a stream goes away mid-call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deployments.replica_sessions import ReplicaSessions
from deployments.resume import resume_token
from deployments.settings import AppSettings
from deployments.store import SessionRecord, SqliteSessionStore
from sinkcache.config import CacheGeometry
from sinkcache.events import SessionSnapshot
from tests.tiny_engine import make_engine, tiny_models

SECRET = "test-secret-" + "x" * 32
SINK, WINDOW = 2, 10


@pytest.fixture(scope="module")
def model():
    return tiny_models()[1]


def settings() -> AppSettings:
    return AppSettings.from_args(
        {"model": "tiny", "sink": SINK, "window": WINDOW, "resume_secret": SECRET}
    )


def stored(session_id: str) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        tokens=tuple(range(5, 17)),
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


class SlowAfterRestore:
    """The engine, with each restore held back after it happened: the window in which a stream
    that goes away cancels the rebuild with the session already in the engine."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.restored = asyncio.Event()
        self.go_on = asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    async def restore_session(self, snapshot: SessionSnapshot):
        info = await self.engine.restore_session(snapshot)
        self.restored.set()
        await self.go_on.wait()
        return info


@pytest.mark.parametrize("held", ["claimed from the store", "offloaded here"])
async def test_a_resume_cancelled_mid_rebuild_leaves_the_session_resumable(
    model, tmp_path: Path, held: str
) -> None:
    """A resume whose stream goes away while its rebuild is in the engine must leave the replica
    knowing the session is there: the next resume gets it (seen in CI as ALREADY_EXISTS, a lost
    session, when a client's resume timed out during a redeploy)."""
    engine = make_engine(model, CacheGeometry(SINK, WINDOW))
    slow = SlowAfterRestore(engine)
    store = SqliteSessionStore(tmp_path / "sessions.db", ttl_s=60.0)
    sessions = ReplicaSessions(slow, "r0", settings(), store)
    await sessions.start()
    try:
        if held == "claimed from the store":
            session_id = "gone." + "a" * 32
            await store.put_many([stored(session_id)])
        else:
            session_id = (await sessions.open()).info.session_id
            assert await sessions._offload(sessions.entries[session_id])
        token = resume_token(SECRET, session_id)

        resuming = asyncio.create_task(sessions.resume(session_id, token))
        await asyncio.wait_for(slow.restored.wait(), 10)
        resuming.cancel()
        await asyncio.sleep(0.05)
        slow.go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await resuming

        attached = await asyncio.wait_for(sessions.resume(session_id, token), 10)
        assert attached.info.session_id == session_id
        expected = 40 if held == "claimed from the store" else 0
        assert attached.info.stream_pos == expected
        assert sessions.entries[session_id].resident
        assert sessions.entries[session_id].detached_since is not None  # no stream: it expires
    finally:
        await sessions.writer.stop(timeout_s=5)
        await engine.shutdown()
        await store.close()
