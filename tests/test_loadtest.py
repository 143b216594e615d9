"""`sinkserve loadtest`: a CI smoke on real Ray, and a stalled server seen as errors, not a hang."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from sinkserve.client import AsyncSession
from sinkserve.health import wait_serving
from sinkserve.loadtest import LoadConfig, LoadStats, run, summary
from sinkwire.v1 import streaming_llm_pb2 as pb
from tests.service import free_port, running_service

pytestmark = pytest.mark.slow


async def test_two_hundred_endless_sessions_lose_nothing() -> None:
    with running_service(model="tiny", replicas=2, slots=150, sink=4, window=124) as address:
        config = LoadConfig(target=address, sessions=200, duration_s=20, ramp_s=5)
        data = summary(config, await run(config))
    assert data["sessions_opened"] == 200
    assert data["sessions_lost"] == 0
    assert data["errors"] == {}, data["error_details"]  # the sessions' (Stats sampler's apart)
    assert data["turns"] >= 200  # every session completed turns, not just opened
    assert data["ttft_ms"]["count"] == data["turns"]
    assert data["server"]["kv_bytes_start"] == data["server"]["kv_bytes_end"]


async def test_a_stalled_engine_shows_as_deadline_errors_and_the_run_still_ends() -> None:
    """Freeze the replica's engine process mid-run (SIGSTOP): replies stall, the load test
    reports DEADLINE_EXCEEDED and lost sessions and ends on time; thawed, the replica serves."""
    port, gateway_port = free_port(), free_port()
    command = [sys.executable, "-m", "deployments.standalone", "replica", "--port", str(port)]
    settings = ["model=tiny", "slots=8", "window=60", "torch_threads=1"]
    replica = subprocess.Popen(
        [*command, "--set", *settings],
        stdout=subprocess.PIPE,
        text=True,
    )
    gateway = None
    try:
        assert "ready" in replica.stdout.readline()
        gateway = subprocess.Popen(  # replicas serve gateways only
            [
                sys.executable, "-m", "deployments.standalone", "gateway",
                "--port", str(gateway_port), "--replica", f"127.0.0.1:{port}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert "ready" in gateway.stdout.readline()
        address = f"127.0.0.1:{gateway_port}"
        wait_serving(address, replicas=1, timeout_s=60)
        (engine,) = psutil.Process(replica.pid).children()
        config = LoadConfig(
            target=address,
            sessions=4,
            duration_s=6,
            ramp_s=0,
            think_s=(0.0, 0.1),
            max_new_tokens=16,
            stall_timeout_s=1.5,
            stats_interval_s=0.5,
        )
        seen: list[LoadStats] = []
        load = asyncio.create_task(run(config, live=lambda point, stats: seen.append(stats)))
        deadline = time.monotonic() + 60
        while not seen or seen[-1].turns == 0:  # freeze once the sessions are taking turns
            assert not load.done() and time.monotonic() < deadline, "no turn ended in 60 s"
            await asyncio.sleep(0.1)
        os.kill(engine.pid, signal.SIGSTOP)
        try:
            # The run ends by itself (each session: its stall timeout, then its resume tries);
            # the cap only turns a hang into a failure.
            stats = await asyncio.wait_for(load, 120)
        except TimeoutError:
            raise AssertionError("the load test did not end in 120 s, its engine frozen") from None
        finally:
            os.kill(engine.pid, signal.SIGCONT)
        data = summary(config, stats)
        assert data["sessions_opened"] == 4 and data["turns"] > 0
        assert data["errors"].get("DEADLINE_EXCEEDED", 0) >= 4
        assert data["sessions_lost"] == 4
        session = await AsyncSession.open(address)  # thawed, the replica serves again
        params = pb.GenerationParams(max_new_tokens=5, ignore_eos=True, temperature=0.0)
        reply = await session.reply(text="hello", generate=params)
        await session.close()
        assert len(reply.ids) == 5
    finally:
        for process in (gateway, replica):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
