"""The generated gRPC code matches the .proto, and the .proto ships inside the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "protos"))
from generate import generate  # noqa: E402


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc wrote nothing"
    for path in fresh:
        committed = REPO / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is not committed: run python protos/generate.py"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.relative_to(REPO)} is stale: run python protos/generate.py"
        )


@pytest.mark.slow
def test_wheel_carries_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("sinkserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sinkwire/protos/sinkserve/v1/streaming_llm.proto" in names
    assert "sinkwire/v1/streaming_llm_pb2_grpc.py" in names
