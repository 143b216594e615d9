"""The Ray-free replica and gateway processes: a stalled engine does not cost sessions their streams."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import psutil
import pytest

from sinkserve.client import AsyncSession, ResumePolicy, SessionError, StreamResumed
from sinkserve.health import is_serving, wait_serving
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc
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


async def _until_dropped(address: str, timeout_s: float = 30.0) -> None:
    """Wait until the gateway at `address` has taken every replica out of routing (its health
    turns NOT_SERVING)."""
    for _ in range(int(timeout_s / 0.25)):
        if not await asyncio.to_thread(is_serving, address):
            return
        await asyncio.sleep(0.25)
    raise AssertionError("the gateway kept the frozen replica")


class Reading:
    """A reply read in the background, its tokens counted as they come, so a test acts on what
    the stream has done (tokens arrived) instead of on how long it has run."""

    def __init__(self, session: AsyncSession, **append: object) -> None:
        self.tokens = 0
        self.task = asyncio.create_task(self._read(session, append))

    async def _read(self, session: AsyncSession, append: dict) -> int:
        async for message in session.append(**append):
            if message.HasField("tokens"):
                self.tokens += len(message.tokens.ids)
        return self.tokens

    async def until(self, tokens: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.tokens < tokens:
            if self.task.done():
                self.task.result()  # its error, if any
                raise AssertionError(f"the reply ended after {self.tokens} of {tokens} tokens")
            assert time.monotonic() < deadline, f"{self.tokens} of {tokens} reply tokens came"
            await asyncio.sleep(0.02)


async def _gateway_stats(address: str) -> pb.StatsResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=10)


def start_replica(port: int) -> subprocess.Popen:
    settings = ["model=tiny", "slots=4", "window=60", "torch_threads=1"]
    return start("replica", "--port", str(port), "--set", *settings)


async def test_a_few_seconds_of_engine_stall_keep_every_stream() -> None:
    """Freeze the engine process mid-reply for longer than the gateway's stats poll may take
    (2 s): the replica keeps answering the gateway (from its last engine stats), so its streams
    stay, and the reply in flight goes on where it stopped once the engine is thawed. Driven by
    what the service reports: the freeze starts once reply tokens flow and lasts until the gateway
    has answered for the replica three times over at least 2.5 s, however slow the box."""
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
        reading = Reading(session, text="go on", generate=params)
        await reading.until(5)
        os.kill(engine.pid, signal.SIGSTOP)
        try:
            frozen_at, answers = time.monotonic(), 0
            while answers < 3 or time.monotonic() - frozen_at < 2.5:
                assert time.monotonic() - frozen_at < 60, "the gateway stopped listing the replica"
                answers += len((await _gateway_stats(address)).replicas)
                await asyncio.sleep(0.5)
            assert not reading.task.done(), "the reply ended while its engine was frozen"
        finally:
            os.kill(engine.pid, signal.SIGCONT)
        assert await asyncio.wait_for(reading.task, 60) == 300
        again = await asyncio.wait_for(session.reply(text="and again", generate=params), 60)
        assert len(again.ids) == 300
        await asyncio.wait_for(session.close(), 30)
    finally:
        for process in (gateway, replica):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)


@pytest.mark.parametrize("auto_resume", [False, True])
async def test_an_unreachable_replica_ends_its_streams_and_its_sessions_resume(
    auto_resume: bool,
) -> None:
    """Freeze the whole replica (gRPC process and engine) past the 5 s a gateway waits: the
    stream in flight ends with UNAVAILABLE at once instead of hanging (the gateway has no session
    store here, so nobody else can rebuild it); once the replica is back, the session resumes
    where its stream stood and goes on. With the client's automatic resume, the reply in flight
    ends in StreamResumed once the replica is back, and the same session object goes on."""
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
        policy = ResumePolicy() if auto_resume else None
        session = await asyncio.wait_for(AsyncSession.open(address, resume_policy=policy), 30)
        endless = pb.GenerationParams(max_new_tokens=100_000, ignore_eos=True, temperature=0.0)
        reading = Reading(session, text="go on", generate=endless)
        reply = reading.task
        await reading.until(5)  # the reply is generating
        frozen = [replica.pid] + [child.pid for child in psutil.Process(replica.pid).children()]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        if auto_resume:
            await _until_dropped(address)  # the stream ends; the client keeps trying to resume
            await asyncio.sleep(1.0)
            assert not reply.done()
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            frozen = []
            with pytest.raises(StreamResumed) as cut:
                await asyncio.wait_for(reply, 60)
            assert cut.value.cause.code == grpc.StatusCode.UNAVAILABLE
            assert not cut.value.rebuilt and cut.value.lost_tokens == 0  # it was never lost
            resumed = session
        else:
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
