"""`sinkserve loadtest --duration N` ends at about N seconds plus a bounded drain, whatever the
service does: a run against a service that stalls (its engine frozen) used to wait out every
stalled turn (up to the stall timeout, 60 s by default, then a resume), so a 20 s test ran for
five minutes. Sessions still busy at the end of the drain are cut and counted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from sinkserve.health import wait_serving
from sinkserve.loadtest import DRAIN_S, LoadConfig, run, summary
from sinkserve.stats import fetch_stats
from tests.service import free_port

pytestmark = pytest.mark.slow


async def test_a_stalled_service_does_not_stretch_the_run_past_its_drain() -> None:
    port, gateway_port = free_port(), free_port()
    replica = subprocess.Popen(
        [sys.executable, "-m", "deployments.standalone", "replica", "--port", str(port),
         "--set", "model=tiny", "slots=8", "window=60", "torch_threads=1"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    gateway = engine = None
    try:
        assert "ready" in replica.stdout.readline()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "deployments.standalone", "gateway",
             "--port", str(gateway_port), "--replica", f"127.0.0.1:{port}"],
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
            duration_s=3,
            ramp_s=0,
            think_s=(0.0, 0.1),
            max_new_tokens=16,
            stall_timeout_s=120,  # far past the drain: the drain, not the stall, must end it
            stats_interval_s=0.5,
        )
        started = time.monotonic()
        load = asyncio.create_task(run(config))
        deadline = time.monotonic() + 60  # a cap: the four open within a second or two
        while fetch_stats(address).sessions < 4:  # every session open, so each is in a turn
            assert time.monotonic() < deadline, "the load test's 4 sessions did not open in 60 s"
            await asyncio.sleep(0.05)
        os.kill(engine.pid, signal.SIGSTOP)  # every turn in flight stalls from here
        stats = await asyncio.wait_for(load, 90)  # a hang fails the test instead
        elapsed = time.monotonic() - started
        data = summary(config, stats)
        assert data["sessions_opened"] == 4
        assert data["sessions_cut_at_end"] == 4, data  # all four stalled mid-turn, then cut
        # Duration plus the drain, with room for a slow box; the stall timeout is 120 s.
        assert elapsed < config.duration_s + DRAIN_S + 15, elapsed
        assert data["elapsed_s"] >= config.duration_s + DRAIN_S - 1  # the drain was given
    finally:
        if engine is not None:
            os.kill(engine.pid, signal.SIGCONT)
        for process in (gateway, replica):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
