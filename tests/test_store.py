"""The durable session store against real backends: a SQLite file and a real redis-server."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from redis.asyncio.connection import AbstractConnection

from deployments.store import (
    RECORD_VERSION,
    CheckpointWriter,
    RedisSessionStore,
    SessionRecord,
    SessionStore,
    SqliteSessionStore,
    StoreUnavailableError,
    default_sqlite_url,
    open_store,
)

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

REPO_ROOT = Path(__file__).resolve().parents[1]
TTL_S = 60.0


def record(
    session_id: str,
    epoch: int = 0,
    replica_id: str = "replica-a",
    stream_pos: int = 300,
    tokens: tuple[int, ...] = tuple(range(7, 107)),
    open_reply: int | None = None,
) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        tokens=tokens,
        stream_pos=stream_pos,
        open_reply=open_reply,
        owner="team-a",
        model="smollm2-135m",
        sink=4,
        window=1020,
        epoch=epoch,
        replica_id=replica_id,
        updated_at=1_750_000_000.25,
    )


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        met = check()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture(params=["sqlite", "redis"])
async def open_test_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[float], SessionStore]]:
    """Opens stores of one backend (any TTL); all closed at the end."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    else:
        url = f"sqlite://{tmp_path}/sessions.db"
    opened: list[SessionStore] = []

    def open_one(ttl_s: float) -> SessionStore:
        opened.append(open_store(url, ttl_s))
        return opened[-1]

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
def store(open_test_store: Callable[[float], SessionStore]) -> SessionStore:
    return open_test_store(TTL_S)


# --- the record --------------------------------------------------------------------------------


@pytest.mark.parametrize("open_reply", [None, -1, 128_009])
def test_record_round_trip(open_reply: int | None) -> None:
    tokens = (0, 1, 2**31 - 1, *range(128_000, 128_000 + 1022))
    original = record(
        "sess-ünïcode", epoch=7, stream_pos=10**12, tokens=tokens, open_reply=open_reply
    )
    assert len(original.tokens) == 1_025

    data = original.to_bytes()

    assert data[0] == RECORD_VERSION
    assert 4 * 1_025 < len(data) < 4 * 1_025 + 100  # int32 ids and a small header
    assert SessionRecord.from_bytes(data) == original


def test_record_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="stream_pos"):
        record("s", stream_pos=3, tokens=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="cannot be encoded"):
        record("s", tokens=(2**31,)).to_bytes()
    data = record("s").to_bytes()
    with pytest.raises(ValueError, match="version"):
        SessionRecord.from_bytes(bytes([RECORD_VERSION + 1]) + data[1:])
    with pytest.raises(ValueError, match="do not fit"):
        SessionRecord.from_bytes(data[:-2])


# --- both backends -----------------------------------------------------------------------------


async def test_put_get_round_trip(store: SessionStore) -> None:
    long = record("long", tokens=tuple(range(1_025)), stream_pos=10**12, open_reply=2)
    empty = record("empty", tokens=(), stream_pos=0, open_reply=-1, replica_id="")

    assert await store.put_many([long, empty]) == []

    assert await store.get("long") == long
    assert await store.get("empty") == empty
    assert await store.get("missing") is None


async def test_fencing_after_claim(store: SessionStore) -> None:
    await store.put_many([record("s", replica_id="a", stream_pos=300)])

    claimed = await store.claim("s", "b")

    assert claimed is not None
    assert (claimed.epoch, claimed.replica_id, claimed.stream_pos) == (1, "b", 300)
    assert claimed.tokens == record("s").tokens
    # The old holder's late checkpoint is refused; the rest of its batch is written.
    late = record("s", epoch=0, replica_id="a", stream_pos=400)
    assert await store.put_many([late, record("t")]) == ["s"]
    kept = await store.get("s")
    assert kept is not None and (kept.epoch, kept.replica_id, kept.stream_pos) == (1, "b", 300)
    assert await store.get("t") == record("t")
    # The new holder writes at its epoch (equal overwrites), and a later claim fences it in turn.
    assert await store.put_many([record("s", epoch=1, replica_id="b", stream_pos=500)]) == []
    assert (await store.get("s")).stream_pos == 500
    assert (await store.claim("s", "c")).epoch == 2
    assert await store.put_many([record("s", epoch=1, replica_id="b", stream_pos=600)]) == ["s"]
    assert await store.claim("missing", "b") is None


async def test_release_only_by_the_holder_at_its_epoch(store: SessionStore) -> None:
    await store.put_many([record("s", replica_id="a")])

    assert not await store.release("s", "b", 0)
    assert not await store.release("s", "a", 1)
    assert await store.release("s", "a", 0)

    released = await store.get("s")
    assert released is not None and (released.replica_id, released.epoch) == ("", 0)
    assert (await store.claim("s", "c")).replica_id == "c"
    assert not await store.release("s", "a", 0)
    assert not await store.release("missing", "a", 0)


async def test_delete_and_count(store: SessionStore) -> None:
    assert await store.count() == 0
    await store.put_many([record("a"), record("b"), record("c")])
    assert await store.count() == 3

    await store.delete("b")
    await store.delete("never-there")

    assert await store.get("b") is None
    assert await store.count() == 2


async def test_ttl_counts_from_the_last_write(
    open_test_store: Callable[[float], SessionStore],
) -> None:
    """A row lives `ttl` from its last write. Judged by measured ages, not by sleeps that a
    loaded box stretches: a row gone before its age reached the TTL fails the test; a row seen
    past its TTL fails it; a round in which the box stalled so long that "kept" (rewritten in the
    middle) could have lived out its TTL too is run again with new rows."""
    ttl = 2.0
    store = open_test_store(ttl)
    for round_ in range(3):
        kept, gone = f"kept{round_}", f"gone{round_}"
        first = time.monotonic()
        await store.put_many([record(kept), record(gone)])
        await asyncio.sleep(ttl / 2)  # at least: every check below uses measured ages
        rewritten = time.monotonic()
        await store.put_many([record(kept, stream_pos=400)])
        while await store.get(gone) is not None:  # until the TTL since the first write
            assert time.monotonic() - first < ttl + 10, "a row outlived its TTL by 10 s"
            await asyncio.sleep(0.02)
        assert time.monotonic() - first >= ttl, "a row expired before its TTL"
        assert await store.claim(gone, "b") is None
        live = await store.get(kept)
        count = await store.count()
        swept = await store.expire() if isinstance(store, SqliteSessionStore) else None
        if time.monotonic() - rewritten >= ttl * 0.9:  # a stall: "kept" may be due too
            print(f"round {round_}: the box stalled past kept's TTL; again")
            await eventually(lambda: _no_rows(store), timeout_s=ttl + 10)
            continue
        assert live is not None and live.stream_pos == 400, "expired though rewritten"
        assert count == 1
        assert swept in (None, 1)  # the expired row deleted (a SQLite store)
        while await store.get(kept) is not None:
            assert time.monotonic() - rewritten < ttl + 10, "a row outlived its TTL by 10 s"
            await asyncio.sleep(0.02)
        assert time.monotonic() - rewritten >= ttl, "a rewritten row expired before its TTL"
        assert await store.count() == 0
        return
    pytest.fail("the box stalled past the TTL in every round")


async def _no_rows(store: SessionStore) -> bool:
    if await store.count():
        return False
    if isinstance(store, SqliteSessionStore):
        await store.expire()
    return True


# --- Redis -------------------------------------------------------------------------------------


async def test_redis_put_many_is_one_round_trip(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisSessionStore(redis_server.url, TTL_S)
    await store.put_many([record("first")])  # the first batch loads the script
    sends = 0
    send_packed_command = AbstractConnection.send_packed_command

    async def count_sends(self: AbstractConnection, *args: object, **kwargs: object) -> None:
        nonlocal sends
        sends += 1
        await send_packed_command(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", count_sends)
    evalsha_before = redis_server.command_calls("evalsha")

    assert await store.put_many([record(f"s{i}") for i in range(200)]) == []

    assert sends == 1
    assert redis_server.command_calls("evalsha") - evalsha_before == 200
    assert redis_server.command_calls("script|exists") == 0
    await store.close()


async def test_redis_batch_lands_after_the_server_lost_its_scripts(
    redis_server: RedisServer,
) -> None:
    store = RedisSessionStore(redis_server.url, TTL_S)
    await store.put_many([record("a")])
    await store._redis.script_flush()

    assert await store.put_many([record("b")]) == []
    assert await store.get("b") == record("b")
    assert (await store.claim("b", "z")).epoch == 1
    await store.close()


async def test_redis_down_is_store_unavailable(redis_server: RedisServer) -> None:
    redis_server.kill()
    store = RedisSessionStore(redis_server.url, TTL_S)
    started = time.monotonic()
    calls = [
        store.put_many([record("a")]),
        store.get("a"),
        store.claim("a", "b"),
        store.release("a", "b", 1),
        store.delete("a"),
        store.count(),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailableError) as raised:
            await call
        assert "\n" not in str(raised.value)
    assert time.monotonic() - started < 5.0
    await store.close()


# --- SQLite ------------------------------------------------------------------------------------

CHILD_WRITER = """
import asyncio, pathlib, sys, time
from deployments.store import SessionRecord, open_store

async def main(url, name, rounds, go):
    while not pathlib.Path(go).exists():
        time.sleep(0.005)
    store = open_store(url, 3600.0)
    epochs = {}
    for round in range(rounds):
        batch = [
            SessionRecord(
                session_id=f"{name}-{i}", tokens=tuple(range(i, i + 300)), stream_pos=1000 + round,
                open_reply=None, owner=name, model="m", sink=4, window=300,
                epoch=epochs.get(i, 0), replica_id=name, updated_at=time.time(),
            )
            for i in range(20)
        ]
        assert await store.put_many(batch) == [], "refused"
        claimed = await store.claim(f"{name}-{round % 20}", name)
        epochs[round % 20] = claimed.epoch
        assert (await store.get(f"{name}-{round % 20}")).stream_pos == 1000 + round
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
"""


async def test_sqlite_two_processes_share_one_file(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/shared.db"
    go = tmp_path / "go"
    rounds = 150
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD_WRITER, url, name, str(rounds), str(go)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("p0", "p1")
    ]
    await asyncio.sleep(0.5)  # both imported and waiting, so they open the new file together
    go.touch()
    for child in children:
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 0, stderr

    store = open_store(url, TTL_S)
    assert await store.count() == 40
    for name in ("p0", "p1"):
        for i in range(20):
            stored = await store.get(f"{name}-{i}")
            assert stored.stream_pos == 1000 + rounds - 1
            assert stored.epoch == rounds // 20 + (i < rounds % 20)
    await store.close()


async def test_sqlite_locked_past_the_busy_timeout_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    store = SqliteSessionStore(path, TTL_S, busy_timeout_s=0.2)
    await store.put_many([record("a")])
    writer_elsewhere = sqlite3.connect(path, isolation_level=None)
    writer_elsewhere.execute("BEGIN IMMEDIATE")

    with pytest.raises(StoreUnavailableError, match="locked"):
        await store.put_many([record("b")])
    assert await store.get("a") == record("a")  # WAL: readers never wait for the writer

    writer_elsewhere.execute("ROLLBACK")
    assert await store.put_many([record("b")]) == []
    writer_elsewhere.close()
    await store.close()


async def test_sqlite_unusable_path_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    store = SqliteSessionStore(tmp_path / "a-file" / "sessions.db", TTL_S)

    with pytest.raises(StoreUnavailableError):
        await store.count()
    await store.close()
    with pytest.raises(StoreUnavailableError, match="closed"):
        await store.count()


# --- open_store --------------------------------------------------------------------------------


async def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://user:secret@cache.example:6380/2"):
        store = open_store(url, TTL_S)
        assert isinstance(store, RedisSessionStore) and isinstance(store, SessionStore)
        assert "secret" not in repr(store)
        await store.close()
    assert open_store(f"sqlite://{tmp_path}/a.db", TTL_S).path == tmp_path / "a.db"
    monkeypatch.chdir(tmp_path)
    assert open_store("b.db", TTL_S).path == tmp_path / "b.db"
    for url in ("", "http://host/x", "sqlite://relative.db", "memcached://host:11211"):
        with pytest.raises(ValueError) as raised:
            open_store(url, TTL_S)
        assert "\n" not in str(raised.value)


def test_default_sqlite_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SINKSERVE_STATE_DIR", raising=False)  # tests/conftest.py sets one
    monkeypatch.setenv("SINKSERVE_CACHE", str(tmp_path / "cache"))
    assert default_sqlite_url() == f"sqlite://{tmp_path}/cache/sessions.db"
    monkeypatch.delenv("SINKSERVE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_sqlite_url() == f"sqlite://{tmp_path}/.cache/sinkserve/sessions.db"


# --- the checkpoint writer ---------------------------------------------------------------------


async def test_writer_keeps_the_newest_record_per_session(store: SessionStore) -> None:
    writer = CheckpointWriter(store)
    for stream_pos in (300, 301, 302):
        writer.submit(record("s", stream_pos=stream_pos))
    writer.submit(record("t"))
    assert writer.pending == 2

    assert await writer.flush()

    assert (writer.flushes, writer.written, writer.pending) == (1, 2, 0)
    assert (await store.get("s")).stream_pos == 302
    assert await store.get("t") == record("t")


async def test_writer_flushes_in_the_background(store: SessionStore) -> None:
    writer = CheckpointWriter(store, interval_s=0.02)
    writer.start()
    for i in range(10):
        writer.submit(record(f"s{i}"))

    await eventually(lambda: store_has(store, [f"s{i}" for i in range(10)]))

    assert writer.running
    assert await writer.stop()


async def test_writer_stop_flushes_what_is_pending(store: SessionStore) -> None:
    writer = CheckpointWriter(store, interval_s=30.0)
    writer.start()
    writer.submit(record("first"))
    await eventually(lambda: store_has(store, ["first"]))
    writer.submit(record("during-the-interval"))

    assert await writer.stop()

    assert not writer.running
    assert await store.get("during-the-interval") == record("during-the-interval")


async def test_writer_reports_refused_ids(store: SessionStore) -> None:
    refused: list[list[str]] = []
    writer = CheckpointWriter(store, on_refused=refused.append)
    await store.put_many([record("s", replica_id="a")])
    await store.claim("s", "b")

    writer.submit(record("s", replica_id="a", stream_pos=999))
    writer.submit(record("t", replica_id="a"))

    assert await writer.flush()
    assert refused == [["s"]]
    assert (writer.written, writer.pending) == (1, 0)
    assert (await store.get("s")).replica_id == "b"


async def test_writer_forget_drops_a_pending_record(store: SessionStore) -> None:
    writer = CheckpointWriter(store)
    writer.submit(record("closed"))
    writer.submit(record("open"))

    writer.forget("closed")
    writer.forget("never-submitted")

    assert await writer.flush()
    await writer.wait_for_in_flight()
    assert await store.get("closed") is None
    assert await store.get("open") == record("open")


async def test_writer_drops_only_a_record_that_cannot_be_encoded(store: SessionStore) -> None:
    writer = CheckpointWriter(store)
    writer.submit(record("bad", tokens=(2**31,)))
    writer.submit(record("good"))

    assert not await writer.flush()
    assert writer.failures == 1 and "cannot be encoded" in writer.last_error
    assert await writer.flush()
    assert await store.get("good") == record("good")
    assert await store.get("bad") is None


async def test_writer_survives_redis_down_and_catches_up(redis_server: RedisServer) -> None:
    store = RedisSessionStore(redis_server.url, TTL_S)
    writer = CheckpointWriter(store, interval_s=0.02, backoff_min_s=0.05, backoff_max_s=0.4)
    writer.start()
    ids = [f"s{i}" for i in range(50)]
    for session_id in ids:
        writer.submit(record(session_id, stream_pos=300))
    await eventually(lambda: writer.pending == 0)

    redis_server.kill()
    for stream_pos in (400, 500):  # newer checkpoints keep replacing older ones while it is down
        for session_id in ids:
            writer.submit(record(session_id, stream_pos=stream_pos))
        await asyncio.sleep(1.0)
    drained = await writer.flush()  # a drain while down answers, it does not hang or raise

    assert not drained
    assert writer.failures >= 3
    assert "session store redis://127.0.0.1" in writer.last_error
    assert writer.pending == len(ids)
    assert writer.running

    redis_server.start()  # same port, empty: everything in it now came from the writer
    await eventually(lambda: writer.pending == 0)

    assert writer.last_error  # still says what happened
    for session_id in ids:
        assert (await store.get(session_id)).stream_pos == 500
    assert await store.count() == len(ids)
    assert await writer.stop()
    await store.close()


async def store_has(store: SessionStore, session_ids: list[str]) -> bool:
    return all([await store.get(session_id) is not None for session_id in session_ids])


async def test_a_resume_asks_the_holder_first_even_while_it_drains(tmp_path: Path) -> None:
    """A draining holder takes no new sessions, but it must still be asked first for one it
    holds: it hands the session off (its newest state into the store) before it refuses, so the
    replica that rebuilds it does not start from an older checkpoint (seen in CI as reply tokens
    lost across a redeploy)."""
    from deployments.gateway_service import GatewayService

    store = SqliteSessionStore(tmp_path / "sessions.db", TTL_S)
    gateway = GatewayService(store=store)
    try:
        await gateway.update(
            [
                {
                    "replica_id": "old",
                    "address": "127.0.0.1:1",
                    "slots_free": 0,
                    "accepting": False,
                },
                {"replica_id": "new", "address": "127.0.0.1:2", "slots_free": 9},
            ]
        )
        session_id = "old." + "a" * 32
        await store.put_many([record(session_id, replica_id="old")])
        candidates = await gateway._resume_candidates(session_id)
        assert [b.replica_id for b in candidates] == ["old", "new"]
    finally:
        await gateway.close()
        await store.close()


async def test_a_stream_waits_a_moment_for_a_replica_instead_of_failing() -> None:
    """A gateway that knows no replica yet (it has just started, while its sibling behind the
    same port already reports the service ready) holds a new stream until the directory names
    one, up to WAIT_FOR_REPLICA_S, instead of refusing it at once (seen in CI as opens failing
    right after the service said it was ready). Past that wait the stream is UNAVAILABLE."""
    import grpc

    from deployments.gateway_service import WAIT_FOR_REPLICA_S
    from sinkwire.v1 import streaming_llm_pb2 as pb
    from tests.local_service import LocalService, exchange

    open_then_close = [pb.ClientMessage(open=pb.Open()), pb.ClientMessage(close=pb.Close())]
    with LocalService(slots=2, engine_process=False) as service:

        async def forget_the_replica() -> None:
            service._tasks[0].cancel()  # the directory poll
            await service.gateway.update([])

        await service.acall(forget_the_replica())
        opening = asyncio.create_task(exchange(service.address, open_then_close))
        await asyncio.sleep(1.0)
        assert not opening.done()
        await service.acall(service._update())  # the directory names the replica
        ended = await opening
        assert ended.code == grpc.StatusCode.OK, ended.details
        assert ended.kinds()[0] == "opened"

        await service.acall(service.gateway.update([]))
        started = time.monotonic()
        ended = await exchange(service.address, open_then_close)
        assert ended.code == grpc.StatusCode.UNAVAILABLE
        assert ended.details == "no session replica is ready yet"
        assert time.monotonic() - started >= WAIT_FOR_REPLICA_S - 0.5
