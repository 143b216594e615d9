"""The session store stays bounded over months: expired sessions are swept once per period for the
whole service (not once per process), the SQLite file reuses or hands back their pages and its WAL
is truncated, every Redis key has a TTL, and Stats shows the store's rows and bytes. Real SQLite
files, a real redis-server, a real gateway over gRPC and a real Ray-free replica process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import redis

from deployments.gateway_service import GatewayService
from deployments.store import (
    RedisSessionStore,
    SessionRecord,
    SqliteSessionStore,
    StoreUpkeep,
    sweep_period_s,
)
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc
from tests.service import free_port

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]


def record(session_id: str, epoch: int = 0, replica_id: str = "gone") -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        tokens=tuple(range(1000, 2024)),  # a full 4 + 1020 cache: 4 KB
        stream_pos=5000,
        open_reply=None,
        owner="",
        model="tiny",
        sink=4,
        window=1020,
        epoch=epoch,
        replica_id=replica_id,
        updated_at=1_750_000_000.0,
    )


async def until(check, what: str, timeout_s: float = 30.0) -> None:
    """Poll `check()` (async) until true; fail naming `what` did not happen by the cap."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        await asyncio.sleep(0.05)


def test_the_sweep_period_follows_the_ttl() -> None:
    assert sweep_period_s(3600.0) == 60.0
    assert sweep_period_s(8.0) == 2.0
    assert sweep_period_s(0.1) == 0.5


async def test_one_sweep_per_period_for_every_process_of_the_file(tmp_path: Path) -> None:
    """Each replica runs an upkeep on the shared file; the store lets only the first of them
    sweep in a period, and the next period whoever asks first."""
    path = tmp_path / "sessions.db"
    stores = [SqliteSessionStore(path, ttl_s=0.2) for _ in range(3)]
    try:
        await stores[0].put_many([record(f"gone.{i:032x}") for i in range(10)])
        await until(lambda: _live_is(stores[0], 0), "the records' expiry")
        answers = [await store.expire_due(60.0) for store in stores]
        assert answers == [10, None, None]
        await stores[1].put_many([record(f"gone.{i:032x}") for i in range(10, 15)])
        await until(lambda: _live_is(stores[1], 0), "the records' expiry")
        assert await stores[2].expire_due(60.0) is None  # not due yet
        assert await stores[2].expire_due(0.1) == 5  # due: this one sweeps
        assert (await stores[0].usage()).rows == 0
    finally:
        for store in stores:
            await store.close()


async def _live_is(store: SqliteSessionStore, live: int) -> bool:
    return (await store.usage()).live == live


async def test_the_sqlite_file_stays_bounded_while_sessions_come_and_go(tmp_path: Path) -> None:
    """Sessions opened and abandoned continuously: after each sweep no expired row is left, the
    WAL is truncated, and the file is no bigger than after the first round (pages reused or
    handed back), where without sweeps it grows with every session ever opened."""
    path = tmp_path / "sessions.db"
    store = SqliteSessionStore(path, ttl_s=0.3)
    upkeep = StoreUpkeep(store, period_s=0.01)
    sizes = []
    try:
        for round_ in range(6):
            ids = [f"gone.{round_:08x}{i:024x}" for i in range(300)]
            await store.put_many([record(session_id) for session_id in ids])
            await until(lambda: _live_is(store, 0), "the records' expiry")
            await asyncio.sleep(0.02)  # one sweep period since the last sweep, at least
            await upkeep.once()
            assert upkeep.usage.rows == 0
            assert os.stat(str(path) + "-wal").st_size == 0, "the WAL was not truncated"
            sizes.append(upkeep.usage.bytes)
        assert upkeep.expired == 6 * 300
        assert max(sizes) <= sizes[0], f"the file grew across rounds: {sizes}"
    finally:
        await store.close()


async def test_every_redis_key_has_a_ttl(redis_server: RedisServer) -> None:
    """Redis expires sessions by itself only if every key it is given carries a TTL: after puts,
    a claim, a release and a re-put, no key of the database lacks one."""
    store = RedisSessionStore(redis_server.url, ttl_s=60.0)
    try:
        await store.put_many([record(f"r0.{i:032x}", replica_id="r0") for i in range(5)])
        claimed = await store.claim(f"r0.{0:032x}", "r1")
        assert await store.release(claimed.session_id, "r1", claimed.epoch)
        await store.put_many([record(f"r0.{1:032x}", epoch=0, replica_id="r0")])
        await store.delete(f"r0.{2:032x}")
        assert await store.expire_due(1.0) is None  # Redis expires them itself
        usage = await store.usage()
        assert (usage.live, usage.rows) == (4, 4) and usage.bytes > 4 * 4096
    finally:
        await store.close()
    with redis.Redis(port=redis_server.port) as client:
        keys = list(client.scan_iter(count=1000))
        assert len(keys) == 4
        for key in keys:
            assert 0 < client.pttl(key) <= 60_000, f"{key!r} has no TTL"


async def test_stats_show_the_store_rows_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    store = SqliteSessionStore(path, ttl_s=60.0)
    gateway = GatewayService(store=store)
    port = free_port()
    server = await gateway.start("127.0.0.1", port)
    try:
        await store.put_many([record(f"gone.{i:032x}") for i in range(7)])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stats = await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=10)
        assert stats.sessions_stored == 7
        assert stats.store_rows == 7
        on_disk = os.stat(path).st_size + os.stat(str(path) + "-wal").st_size
        assert stats.store_bytes == on_disk > 7 * 4096
    finally:
        await gateway.close()
        await server.stop(grace=None)
        await store.close()


async def test_a_replica_sweeps_sessions_nobody_resumed(tmp_path: Path) -> None:
    """Issue 19 defect 1: rows of sessions handed back to the store or left by a dead replica
    belonged to no replica's sweep and stayed forever. A real Ray-free replica process, its TTL
    short, removes them by itself."""
    path = tmp_path / "sessions.db"
    seed = SqliteSessionStore(path, ttl_s=2.0)
    await seed.put_many([record(f"gone.{i:032x}") for i in range(50)])
    settings = [
        "model=tiny",
        "slots=2",
        "window=60",
        "torch_threads=1",
        f"session_store=sqlite://{path}",
        "session_ttl_s=2",
    ]
    command = [sys.executable, "-m", "deployments.standalone", "replica"]
    replica = subprocess.Popen(
        [*command, "--port", str(free_port()), "--set", *settings],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = await asyncio.to_thread(replica.stdout.readline)
        assert "ready" in line, f"the replica did not start: {line!r}"
        await until(
            lambda: _rows_are(seed, 0), "the replica's sweep of the abandoned rows", timeout_s=60
        )
    finally:
        replica.terminate()
        await asyncio.to_thread(replica.wait, 30)
        await seed.close()


async def _rows_are(store: SqliteSessionStore, rows: int) -> bool:
    return (await store.usage()).rows == rows


def test_sinkserve_stats_shows_the_store() -> None:
    from rich.console import Console

    from sinkserve.stats import stats_table

    stats = pb.StatsResponse(sessions_stored=12, store_rows=15, store_bytes=3 << 20)
    console = Console(width=80, record=True)
    console.print(stats_table(stats, "localhost:50051"))
    text = " ".join(console.export_text().split())
    assert "session store: 12 sessions, 15 rows" in text and "3 MiB" in text
    without = pb.StatsResponse(sessions_stored=-1, store_rows=-1, store_bytes=-1)
    console = Console(width=80, record=True)
    console.print(stats_table(without, "localhost:50051"))
    assert "session store" not in console.export_text()
