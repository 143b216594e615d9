"""Fault drills on the real service (Ray, gRPC over loopback, a real session store): sessions
outlive a replica crash, an engine crash, a redeploy, a restart of the whole service, a store
outage, and more sessions than slots."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from deployments.checks import SettingsError, check_port_free
from deployments.store import open_store
from sinkserve.client import AsyncSession, GenerationParams, StreamResumed
from sinkserve.health import wait_serving
from sinkserve.loadtest import LoadConfig, run, summary
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc
from tests.service import free_port, running_service

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.redis_server"]

GREEDY = GenerationParams(max_new_tokens=6, temperature=0.0)
SERVICE = dict(model="tiny", replicas=2, slots=320, sink=4, window=60, idle_offload_s=600)


def _chaos_run(address: str, target: str) -> LoadConfig:
    # 300 generating sessions; a process killed 20 s in and another 35 s in, then 20 s with no
    # kill: the replaced replicas come back (about 20 s each on a loaded 2-core box) and every
    # session has time to show a turn after its failover. Without that quiet stretch, a slow box
    # ends the run before any failed-over session finishes a turn.
    return LoadConfig(
        target=address,
        sessions=300,
        duration_s=50,
        ramp_s=5,
        think_s=(1.0, 3.0),  # below what the box can serve: the drill times failover, not a queue
        max_new_tokens=8,
        stall_timeout_s=60,
        chaos_kill_every_s=15,
        chaos_target=target,
        chaos_kills=2,
    )


def _assert_nothing_lost(data: dict) -> None:
    keys = ("kills", "sessions_resumed", "resume_ms", "failover_ms", "errors", "ttft_ms", "itl_ms")
    print("drill:", {k: data[k] for k in keys})
    assert data["kills"], "nothing was killed"
    assert data["sessions_opened"] == 300
    assert data["sessions_lost"] == 0, data["errors"]
    assert data["opens_failed"] == 0
    assert data["position_errors"] == 0  # every session went on exactly where it stood
    assert data["sessions_resumed"] > 0
    assert data["failover_ms"]["count"] > 0


async def test_a_killed_replica_and_a_killed_engine_lose_no_session(tmp_path: Path) -> None:
    """SIGKILL one replica's process under load, then (15 s later) one replica's engine process
    (SQLite store): every session they held resumes on another replica, rebuilt from its last
    checkpoint, and goes on exactly where that checkpoint stood."""
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    with running_service(session_store=store, **SERVICE) as address:
        config = _chaos_run(address, "alternate")
        data = summary(config, await run(config))
    _assert_nothing_lost(data)
    assert [kill["target"] for kill in data["kills"]] == ["replica", "engine"]


async def test_redis_down_for_ten_seconds_under_load(redis_server: RedisServer) -> None:
    """The store goes away for 10 s: serving goes on, failed checkpoints are counted and retried,
    and once it is back every session's newest checkpoint is in it."""
    with running_service(session_store=redis_server.url, **SERVICE) as address:
        config = LoadConfig(
            target=address, sessions=60, duration_s=30, ramp_s=3, think_s=(0.2, 0.6)
        )
        load = asyncio.create_task(run(config))
        await asyncio.sleep(8)
        redis_server.kill()
        await asyncio.sleep(10)
        failures = sum(r.checkpoint_failures for r in (await _stats(address)).replicas)
        redis_server.start()  # same port, empty: everything must be written again
        await asyncio.sleep(5)
        caught_up = await _count_in_store(redis_server.url)  # the load still runs
        data = summary(config, await load)
        # A session that ended its last turn is checkpointed at that turn's end.
        session = await AsyncSession.open(address)
        reply = await session.reply(text="one more", generate=GREEDY)
        await asyncio.sleep(1)
        store = open_store(redis_server.url, ttl_s=60)
        record = await store.get(session.session_id)
        await store.close()
    assert failures > 0
    assert data["sessions_lost"] == 0 and data["errors"] == {}
    assert caught_up >= 60  # every load-test session is back in the emptied store
    assert record is not None and record.stream_pos == reply.end.stream_position


async def test_a_redeploy_drains_replicas_without_losing_a_session(tmp_path: Path) -> None:
    """A Serve redeploy (new settings: every replica replaced, one fewer) under load: replicas
    drain (replies finish, sessions are checkpointed), streams end with UNAVAILABLE, clients
    resume on the new replicas. Nothing is lost, not even a reply token."""
    from ray import serve

    from deployments.app import build_app
    from deployments.settings import AppSettings

    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    with running_service(session_store=store, **SERVICE) as address:
        config = LoadConfig(
            target=address, sessions=100, duration_s=25, ramp_s=3, think_s=(0.2, 0.6)
        )
        load = asyncio.create_task(run(config))
        await asyncio.sleep(8)
        port = int(address.rsplit(":", 1)[1])
        changed = AppSettings.from_args(
            {**SERVICE, "replicas": 1, "port": port, "host": "127.0.0.1", "torch_threads": 1,
             "session_store": store, "flush_interval_s": 0.004}
        )  # fmt: skip
        await asyncio.to_thread(
            serve.run, build_app(changed), name=changed.application, route_prefix=None
        )
        data = summary(config, await load)
    assert data["sessions_lost"] == 0, data["errors"]
    assert data["position_errors"] == 0
    assert data["sessions_resumed"] > 0  # the streams did move
    assert data["lost_reply_tokens"] == 0  # drained, not crashed


async def test_more_sessions_than_slots_each_resumed_in_turn() -> None:
    """2,000 sessions held on 200 slots: each opened and fed, dropped, then resumed in turn and
    answering with its stream position continuous (idle sessions leave the GPU; the next message
    rebuilds them)."""
    with running_service(
        model="tiny", replicas=1, slots=200, sink=4, window=28, session_store="off"
    ) as address:
        channel = grpc.aio.insecure_channel(address)
        gate = asyncio.Semaphore(64)
        short = GenerationParams(max_new_tokens=2, temperature=0.0)

        async def first(i: int) -> tuple[str, str, int]:
            async with gate:
                session = await AsyncSession.open(address, channel=channel)
                reply = await session.reply(tokens=[1 + i % 50, 2, 3], generate=short)
                await session.disconnect()
                return session.session_id, session.resume_token, reply.end.stream_position

        held = await asyncio.gather(*(first(i) for i in range(2000)))
        stats = await _stats(address)
        assert stats.sessions <= 200 and stats.sessions + stats.sessions_offloaded == 2000

        async def again(session_id: str, token: str, position: int) -> None:
            async with gate:
                session = await AsyncSession.resume(address, session_id, token, channel=channel)
                assert session.opened.stream_position == position
                reply = await session.reply(tokens=[7], generate=short)
                assert reply.end.stream_position == position + 1 + reply.end.generated_tokens
                await session.disconnect()

        await asyncio.gather(*(again(*entry) for entry in held))
        await channel.close()


async def test_the_whole_service_killed_and_restarted(tmp_path: Path) -> None:
    """`kill -9` of `sinkserve serve` and everything it started, then a restart with the same
    SQLite store: every session resumes where it stood (rebuilt), and goes on."""
    port = free_port()
    # The same resume secret and store across the restart (as a local run keeps them in its cache).
    env = {**os.environ, "SINKSERVE_RESUME_SECRET": "drill-" + os.urandom(8).hex()}
    command = [
        sys.executable, "-m", "sinkserve.cli", "serve", "--model", "tiny", "--replicas", "2",
        "--slots", "64", "--window", "60", "--host", "127.0.0.1", "--port", str(port),
        "--gateways", "1", "--session-store", f"sqlite:///{tmp_path / 'sessions.db'}",
    ]  # fmt: skip

    def start() -> subprocess.Popen:
        process = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 300
        for line in process.stdout:
            if line.startswith("ready"):
                return process
            if time.monotonic() > deadline:
                break
        raise AssertionError("sinkserve serve did not start")

    first = start()
    address = f"127.0.0.1:{port}"
    try:
        sessions = []
        for i in range(20):
            session = await AsyncSession.open(address)
            for _ in range(2):
                reply = await session.reply(text=f"turn of session {i}", generate=GREEDY)
            sessions.append((session.session_id, session.resume_token, reply.end.stream_position))
            await session.disconnect()
        await asyncio.sleep(1.0)  # checkpoints are write-behind: let the last ones land
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the CLI, Ray and every replica it started
        first.wait()
    # Ray's workers (the gateway among them) exit when they see their raylet gone, not at once:
    # a restart before then is refused in one line ("port ... is in use"), as it should be.
    _wait_port_free(port, timeout_s=60)
    second = start()
    try:
        wait_serving(address, replicas=2, timeout_s=120)
        for session_id, token, position in sessions:
            session = await AsyncSession.resume(address, session_id, token)
            assert session.opened.resumed and session.opened.rebuilt
            assert session.opened.stream_position == position
            reply = await session.reply(text="after the restart", generate=GREEDY)
            assert reply.end.stream_position == (
                position + reply.end.input_tokens + reply.end.generated_tokens
            )
            await session.close()
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        try:
            second.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()


def _wait_port_free(port: int, timeout_s: float) -> None:
    """Until `sinkserve serve` would start here: the same check it runs before starting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check_port_free("127.0.0.1", port, "port")
            return
        except SettingsError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


async def _stats(address: str) -> pb.StatsResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=10)


async def _count_in_store(url: str) -> int:
    store = open_store(url, ttl_s=60)
    try:
        return await store.count()
    finally:
        await store.close()


def test_stream_resumed_is_raised_to_the_call_that_was_cut() -> None:
    """Unit check of the client's contract (no server): lost tokens are the ones seen past the
    position the session continues at."""
    cause = type("E", (), {"code": grpc.StatusCode.UNAVAILABLE, "details": "gone"})()
    opened = pb.Opened(stream_position=40, rebuilt=True)
    resumed = StreamResumed(cause, opened, seen=52, failed_at=1.0)
    assert resumed.lost_tokens == 12 and resumed.rebuilt and resumed.stream_position == 40
