"""The soak's CI version (bench/soak.py): three minutes of a real `sinkserve serve` (tiny model,
2 replicas, SQLite store, an 8 s session TTL) with sessions opened and abandoned continuously, a
replica killed every minute, and a blocking and an asyncio client whose connections are cut every
5 s. The bounds must hold: store rows and bytes flat after the TTL, RSS, threads and fds of every
process flat, no resumed session lost or behind a turn end it was sent, no ALREADY_EXISTS or
NOT_FOUND for a live session. The hour-long run is in docs/reliability.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CI_SOAK = [
    "--minutes", "3", "--ttl-s", "8", "--idle-offload-s", "2", "--open-per-s", "2",
    "--kill-every-s", "60", "--resume-every-s", "5", "--sample-s", "2",
]  # fmt: skip


def test_a_short_soak_stays_within_its_bounds(tmp_path: Path) -> None:
    record = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "bench/soak.py", *CI_SOAK, "--workdir", str(tmp_path / "work"),
         "--json", str(record), "--plot", str(tmp_path / "soak.png")],
        cwd=REPO, capture_output=True, text=True, timeout=3 * 60 + 240,
    )  # fmt: skip
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(record.read_text())
    assert data["violations"] == [], "\n".join(data["violations"])
    assert data["opened"] >= 200, "too few sessions opened and abandoned to judge the store"
    assert len(data["kills"]) >= 1 and all("replaced_after_s" in k for k in data["kills"])
    assert data["resumes"]["blocking"] >= 10 and data["resumes"]["asyncio"] >= 10
