"""CI smoke of `sinkserve loadtest`: real Ray, 2 replicas, many concurrent endless sessions."""

from __future__ import annotations

import pytest

from sinkserve.loadtest import LoadConfig, run, summary
from tests.service import running_service

pytestmark = pytest.mark.slow


async def test_two_hundred_endless_sessions_lose_nothing() -> None:
    with running_service(model="tiny", replicas=2, slots=150, sink=4, window=124) as address:
        config = LoadConfig(target=address, sessions=200, duration_s=20, ramp_s=5)
        data = summary(config, await run(config))
    assert data["sessions_opened"] == 200
    assert data["sessions_lost"] == 0
    assert data["errors"] == {}
    assert data["turns"] >= 200  # every session completed turns, not just opened
    assert data["ttft_ms"]["count"] == data["turns"]
    assert data["server"]["kv_bytes_start"] == data["server"]["kv_bytes_end"]
