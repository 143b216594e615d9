"""Fault drills on the real service (Ray, gRPC over loopback, a real session store): sessions
outlive a replica crash, an engine crash, a redeploy, a restart of the whole service, a store
outage, and more sessions than slots."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from deployments.checks import SettingsError, check_port_free
from deployments.store import StoreUnavailableError, open_store
from sinkserve.client import AsyncSession, GenerationParams, StreamResumed
from sinkserve.health import wait_serving
from sinkserve.loadtest import LoadConfig, LoadStats, run, summary
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
    # 300 generating sessions and two kills, driven by what the service reports (loadtest's
    # chaos): the first kill 5 s after the ramp, the second 5 s after Stats shows the first one's
    # replacement serving (20-78 s on a loaded 2-core box), and the run ends once every session
    # has ended a turn since the second replacement served. The duration is only the cap.
    return LoadConfig(
        target=address,
        sessions=300,
        duration_s=DRILL_CAP_S,
        ramp_s=5,
        think_s=(1.0, 3.0),  # below what the box can serve: the drill times failover, not a queue
        max_new_tokens=8,
        stall_timeout_s=60,
        chaos_kill_every_s=5,
        chaos_target=target,
        chaos_kills=2,
    )


DRILL_CAP_S = 300.0


def _assert_nothing_lost(data: dict, sessions: int = 300) -> None:
    keys = (
        "kills", "sessions_resumed", "resume_ms", "failover_ms", "errors", "sampler_errors",
        "resumed_behind_turn_end", "elapsed_s", "ttft_ms", "itl_ms",
    )  # fmt: skip
    print("drill:", {k: data.get(k) for k in keys})
    assert data["kills"], "nothing was killed"
    assert all("replaced_after_s" in kill for kill in data["kills"]), (
        f"a killed process was not replaced within the {DRILL_CAP_S:.0f} s cap: {data['kills']}"
    )
    assert data["chaos_settled"], (
        f"the {DRILL_CAP_S:.0f} s cap came before every session had ended a turn after the last "
        "replacement served"
    )
    assert data["sessions_opened"] == sessions
    assert data["sessions_lost"] == 0, data["errors"]
    assert data["opens_failed"] == 0
    assert data.get("sessions_cut_at_end", 0) == 0  # every session closed
    assert data["position_errors"] == 0  # every session went on exactly where it stood
    assert data["sessions_resumed"] > 0
    assert data["failover_ms"]["count"] > 0
    # The only errors are the broken streams that were resumed (one each): nothing else failed.
    assert sum(data["errors"].values()) == data["sessions_resumed"], data["error_details"]
    # A TurnEnd is durable: no session comes back behind a turn end it was sent.
    assert data["resumed_behind_turn_end"] == 0


async def test_a_killed_replica_and_a_killed_engine_lose_no_session(tmp_path: Path) -> None:
    """SIGKILL one replica's process under load, then (once its replacement serves) one replica's
    engine process (SQLite store): every session they held resumes on another replica, rebuilt
    from its last checkpoint, goes on exactly where that checkpoint stood (never behind a turn end
    it was sent), and nothing fails but the broken streams, each resumed."""
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    with running_service(session_store=store, **SERVICE) as address:
        config = _chaos_run(address, "alternate")
        data = summary(config, await run(config))
    _assert_nothing_lost(data)
    assert [kill["target"] for kill in data["kills"]] == ["replica", "engine"]


async def test_redis_down_under_load(redis_server: RedisServer) -> None:
    """The store goes away under load: serving goes on, failed checkpoints are counted and
    retried, and once it is back (empty) every session's newest checkpoint is written again while
    the load still runs. Each step waits on what the service reports."""
    with running_service(session_store=redis_server.url, **SERVICE) as address:
        config = LoadConfig(
            target=address, sessions=60, duration_s=LOAD_CAP_S, ramp_s=3, think_s=(0.2, 0.6)
        )
        running = _Running(config)
        await running.until(lambda s: len(s.last_turn_end) == 60, "every session ended a turn")
        redis_server.kill()
        failures = await _until_stats(
            address,
            lambda stats: sum(r.checkpoint_failures for r in stats.replicas) or None,
            "no replica counted a failed checkpoint with the store down",
        )
        redis_server.start()  # same port, empty: everything must be written again
        await _until(
            lambda: _count_in_store(redis_server.url),
            lambda count: count >= 60,
            "the load-test sessions were not all written back to the emptied store",
        )
        assert not running.task.done(), "the load ended before the store caught up"
        data = await running.finish()
        # A session that ended its last turn is checkpointed at that turn's end.
        session = await AsyncSession.open(address)
        reply = await session.reply(text="one more", generate=GREEDY)
        store = open_store(redis_server.url, ttl_s=60)
        try:
            await _until(
                lambda: store.get(session.session_id),
                lambda r: r is not None and r.stream_pos == reply.end.stream_position,
                "the last turn's end never reached the store",
            )
        finally:
            await store.close()
    assert failures > 0
    assert data["sessions_lost"] == 0 and data["errors"] == {}, data["error_details"]


async def test_a_redeploy_drains_replicas_without_losing_a_session(tmp_path: Path) -> None:
    """A Serve redeploy (new settings: every replica replaced, one fewer) under load: replicas
    drain (replies finish, sessions are checkpointed), streams end with UNAVAILABLE, clients
    resume on the new replicas. Nothing is lost, not even a reply token, and no client sees
    ALREADY_EXISTS or NOT_FOUND. The load runs until every session has ended a turn on the new
    deployment."""
    from ray import serve

    from deployments.app import build_app
    from deployments.settings import AppSettings

    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    with running_service(session_store=store, **SERVICE) as address:
        config = LoadConfig(
            target=address, sessions=100, duration_s=LOAD_CAP_S, ramp_s=3, think_s=(0.2, 0.6)
        )
        running = _Running(config)
        await running.until(lambda s: len(s.last_turn_end) == 100, "every session ended a turn")
        port = int(address.rsplit(":", 1)[1])
        changed = AppSettings.from_args(
            {**SERVICE, "replicas": 1, "port": port, "host": "127.0.0.1", "torch_threads": 1,
             "session_store": store, "flush_interval_s": 0.004}
        )  # fmt: skip
        await asyncio.to_thread(
            serve.run, build_app(changed), name=changed.application, route_prefix=None
        )
        await _until_stats(
            address, lambda stats: len(stats.replicas) == 1 or None, "the old replicas stayed"
        )
        redeployed = time.monotonic()
        await running.until(
            lambda s: s.failing_over == 0 and all(t > redeployed for t in s.last_turn_end.values()),
            "every session ended a turn on the new deployment",
        )
        data = await running.finish()
    print("redeploy:", {k: data[k] for k in ("sessions_resumed", "errors", "sampler_errors")})
    assert data["sessions_lost"] == 0, data["errors"]
    assert data["position_errors"] == 0
    assert data["sessions_resumed"] > 0  # the streams did move
    assert data["lost_reply_tokens"] == 0  # drained, not crashed
    assert "ALREADY_EXISTS" not in data["errors"] and "NOT_FOUND" not in data["errors"], data[
        "error_details"
    ]
    assert sum(data["errors"].values()) == data["sessions_resumed"], data["error_details"]


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
    url = f"sqlite:///{tmp_path / 'sessions.db'}"
    # The same resume secret and store across the restart (as a local run keeps them in its cache).
    env = {**os.environ, "SINKSERVE_RESUME_SECRET": "drill-" + os.urandom(8).hex()}
    command = [
        sys.executable, "-m", "sinkserve.cli", "serve", "--model", "tiny", "--replicas", "2",
        "--slots", "64", "--window", "60", "--host", "127.0.0.1", "--port", str(port),
        "--gateways", "1", "--session-store", url,
    ]  # fmt: skip

    first = _Served(command, env)
    address = f"127.0.0.1:{port}"
    try:
        sessions = []
        for i in range(20):
            session = await AsyncSession.open(address)
            for _ in range(2):
                reply = await session.reply(text=f"turn of session {i}", generate=GREEDY)
            sessions.append((session.session_id, session.resume_token, reply.end.stream_position))
            await session.disconnect()
        # Checkpoints may be written behind the turn's end: until every last one is in the store.
        await _until(
            lambda: _positions_in_store(url, [s[0] for s in sessions]),
            lambda stored: stored == [s[2] for s in sessions],
            "the sessions' last checkpoints did not reach the store",
        )
    finally:
        first.kill()  # the CLI, Ray and every replica it started
    # Ray's workers (the gateway among them) exit when they see their raylet gone, not at once:
    # a restart before then is refused in one line ("port ... is in use"), as it should be.
    _wait_port_free(port, timeout_s=60)
    second = _Served(command, env)
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
        second.stop()


class _Served:
    """`sinkserve serve` in its own process group, started until it prints `ready` (at most
    300 s, or it exits: either fails with its output). Its output is read all along, so a full
    pipe never blocks it."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 300
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError("sinkserve serve printed no 'ready' in 300 s") from None
            if line is None:
                raise AssertionError("sinkserve serve exited before 'ready':\n" + self.tail())
            if line.startswith("ready"):
                return

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def tail(self) -> str:
        return "".join(self.output[-30:])

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.kill()


class _Running:
    """A load test running in the background, its live numbers readable: a test waits on them
    (`until`) and ends the run when it has seen what it needs (`finish`), the duration being only
    the cap."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.stats: LoadStats | None = None

        def live(point: dict, stats: LoadStats) -> None:
            self.stats = stats

        self.task = asyncio.create_task(run(config, live=live))

    async def until(self, condition, what: str) -> None:
        deadline = time.monotonic() + self.config.ramp_s + self.config.duration_s
        while self.stats is None or not condition(self.stats):
            assert not self.task.done(), f"the load ended before {what}"
            assert time.monotonic() < deadline, f"not within the load's cap: {what}"
            await asyncio.sleep(0.2)

    async def finish(self) -> dict:
        assert self.stats is not None
        self.stats.settled.set()  # conversations end after their current turn
        return summary(self.config, await self.task)


LOAD_CAP_S = 240.0


async def _until(read, check, what: str, timeout_s: float = 60.0):
    """`await read()` until `check` passes on it; its last value. Fails saying `what` did not
    happen within the cap."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await read()
        if check(value):
            return value
        assert time.monotonic() < deadline, f"{what} (within {timeout_s:.0f} s; last: {value})"
        await asyncio.sleep(0.2)


async def _until_stats(address: str, pick, what: str, timeout_s: float = 120.0):
    """`pick(Stats)` once it is not None (a Stats call that fails counts as not yet)."""

    async def read():
        try:
            return pick(await _stats(address))
        except grpc.aio.AioRpcError:
            return None

    return await _until(read, lambda value: value is not None, what, timeout_s)


async def _positions_in_store(url: str, session_ids: list[str]) -> list[int | None]:
    store = open_store(url, ttl_s=3600)
    try:
        records = [await store.get(session_id) for session_id in session_ids]
    finally:
        await store.close()
    return [r.stream_pos if r is not None else None for r in records]


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
    """Rows in the store; -1 while it does not answer."""
    store = open_store(url, ttl_s=60)
    try:
        return await store.count()
    except StoreUnavailableError:
        return -1
    finally:
        await store.close()


def test_stream_resumed_is_raised_to_the_call_that_was_cut() -> None:
    """Unit check of the client's contract (no server): lost tokens are the ones seen past the
    position the session continues at."""
    cause = type("E", (), {"code": grpc.StatusCode.UNAVAILABLE, "details": "gone"})()
    opened = pb.Opened(stream_position=40, rebuilt=True)
    resumed = StreamResumed(cause, opened, seen=52, failed_at=1.0)
    assert resumed.lost_tokens == 12 and resumed.rebuilt and resumed.stream_position == 40
