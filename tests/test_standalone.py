"""The Ray-free replica and gateway processes: a stalled engine does not cost sessions their streams."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import psutil
import pytest

from sinkserve.client import AsyncSession, SessionError
from sinkserve.health import wait_serving
from sinkwire.v1 import streaming_llm_pb2 as pb
from tests.service import free_port

pytestmark = pytest.mark.slow


def start(role: str, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "deployments.standalone", role, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert "ready" in process.stdout.readline()
    return process


def start_replica(port: int) -> subprocess.Popen:
    settings = ["model=tiny", "slots=4", "window=60", "torch_threads=1"]
    return start("replica", "--port", str(port), "--set", *settings)


async def test_a_few_seconds_of_engine_stall_keep_every_stream() -> None:
    """Freeze the engine process for longer than the gateway's stats poll may take (2 s) but
    less than a replica may stay unheard (5 s): the reply in flight resumes where it stopped."""
    replica_port, gateway_port = free_port(), free_port()
    replica = start_replica(replica_port)
    gateway = None
    try:
        gateway = start(
            "gateway", "--port", str(gateway_port), "--replica", f"localhost:{replica_port}"
        )
        address = f"127.0.0.1:{gateway_port}"
        wait_serving(address, replicas=1, timeout_s=60)
        (engine,) = psutil.Process(replica.pid).children()
        session = await asyncio.wait_for(AsyncSession.open(address), 30)
        params = pb.GenerationParams(max_new_tokens=300, ignore_eos=True, temperature=0.0)
        reply = asyncio.create_task(session.reply(text="go on", generate=params))
        await asyncio.sleep(1.0)
        os.kill(engine.pid, signal.SIGSTOP)
        await asyncio.sleep(4.0)
        os.kill(engine.pid, signal.SIGCONT)
        assert len((await asyncio.wait_for(reply, 60)).ids) == 300
        again = await asyncio.wait_for(session.reply(text="and again", generate=params), 60)
        assert len(again.ids) == 300
        await asyncio.wait_for(session.close(), 30)
    finally:
        for process in (gateway, replica):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)


async def test_an_unreachable_replica_ends_its_streams_and_its_sessions_resume() -> None:
    """Freeze the whole replica (gRPC process and engine) past the 5 s a gateway waits: the
    stream in flight ends with UNAVAILABLE at once instead of hanging; once the replica is back,
    the session resumes where its stream stood and goes on."""
    replica_port, gateway_port = free_port(), free_port()
    replica = start_replica(replica_port)
    gateway = None
    frozen = []
    try:
        gateway = start(
            "gateway", "--port", str(gateway_port), "--replica", f"localhost:{replica_port}"
        )
        address = f"127.0.0.1:{gateway_port}"
        wait_serving(address, replicas=1, timeout_s=60)
        session = await asyncio.wait_for(AsyncSession.open(address), 30)
        endless = pb.GenerationParams(max_new_tokens=100_000, ignore_eos=True, temperature=0.0)
        reply = asyncio.create_task(session.reply(text="go on", generate=endless))
        await asyncio.sleep(1.0)
        frozen = [replica.pid] + [child.pid for child in psutil.Process(replica.pid).children()]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        with pytest.raises(SessionError) as ended:
            await asyncio.wait_for(reply, 20)
        assert ended.value.code == grpc.StatusCode.UNAVAILABLE
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        frozen = []
        wait_serving(address, replicas=1, timeout_s=30)
        resumed = await asyncio.wait_for(
            AsyncSession.resume(address, session.session_id, session.resume_token), 30
        )
        assert resumed.opened.resumed and resumed.opened.stream_position > 0  # tokens kept
        params = pb.GenerationParams(max_new_tokens=20, ignore_eos=True, temperature=0.0)
        assert (
            len((await asyncio.wait_for(resumed.reply(text="more", generate=params), 60)).ids) == 20
        )
        await resumed.close()
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        for process in (gateway, replica):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
