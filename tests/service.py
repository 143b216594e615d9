"""Start the real Serve application on a local Ray cluster for tests (gRPC on loopback)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deployments.settings import AppSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_service(**overrides) -> Iterator[str]:
    """Yield the gateway address of a freshly deployed app; tear everything down after."""
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.gateway import DIRECTORY_POLL_S
    from sinkserve.health import wait_serving

    settings = AppSettings.from_args(
        {
            "host": "127.0.0.1",
            "port": free_port(),
            "openai_port": free_port(),
            "torch_threads": 1,
            **overrides,
        }
    )
    _start_ray()
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(settings), name=settings.application, route_prefix=None)
        address = f"127.0.0.1:{settings.port}"
        wait_serving(address, replicas=settings.replicas, timeout_s=120)
        # That asked one gateway; the others see every replica at their next directory read.
        # Without this wait, a test's first streams (sharing one connection, so one gateway) can
        # all land on a gateway that knows one replica yet.
        time.sleep(2 * DIRECTORY_POLL_S)
        yield address
    finally:
        # The cluster goes with everything on it (Serve's graceful drain would add about 10 s to
        # every test that starts a service; the drain has its own tests).
        ray.shutdown()


def _start_ray() -> None:
    """A local Ray cluster, on a box the previous test's cluster may still be leaving (seen in CI:
    "The current node timed out during startup" right after a fault drill): wait for its
    processes to exit first, and try once more if the new node still times out."""
    import psutil
    import ray

    psutil.wait_procs(
        [p for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")],
        timeout=30,
    )
    for attempt in (1, 2):
        try:
            ray.init(
                num_cpus=8,
                include_dashboard=False,
                namespace="sinkserve-tests",
                log_to_driver=False,
            )
            return
        except Exception as error:
            if attempt == 2 or "timed out during startup" not in str(error):
                raise
            print(f"ray.init failed ({error}); once more", file=sys.stderr)
            ray.shutdown()


def run_sinkserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`sinkserve ARGS` as a new user runs it (from the repository root), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "sinkserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parent.parent,
    )
