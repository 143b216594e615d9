"""A real `redis-server` for tests: started on a free port, killable and restartable in place.

Use it from a test module with `pytest_plugins = ["tests.redis_server"]` and the `redis_server`
fixture. When `redis-server` is missing and we run as root with apt-get, it is installed once (the
Debian package); otherwise the test fails saying so: the store is never faked.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from filelock import FileLock

INSTALL_LOCK = Path("/tmp/sinkserve-redis-server-install.lock")
START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """Path of `redis-server`, installing the Debian package when that is possible."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(
            "redis-server is not on PATH: install it (Debian/Ubuntu: apt-get install redis-server)"
        )
    with FileLock(INSTALL_LOCK):
        found = shutil.which("redis-server")
        if found:
            return found
        # RUNLEVEL=1 keeps the package's init script from starting a daemon of its own.
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "redis-server"]):
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    found = shutil.which("redis-server")
    if not found:
        pytest.fail("apt-get installed redis-server but it is not on PATH")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One redis-server process without persistence: a restart comes back empty, on the same port."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server did not start on port {self.port}"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients, like a crashed or lost node."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def command_calls(self, command: str) -> int:
        """Calls of one command so far (INFO commandstats), e.g. 'evalsha'."""
        with redis.Redis(port=self.port) as client:
            stats = client.info("commandstats").get(f"cmdstat_{command}")
        return stats["calls"] if stats else 0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(redis_server_binary(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()
