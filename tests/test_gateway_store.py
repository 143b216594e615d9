"""What a gateway answers a Resume for a session whose replica it does not know, by what the
session store says: NOT_FOUND (gone for good) only when the store says the session is not there.
A real gateway over gRPC on loopback and a real redis-server, killed or frozen (SIGSTOP)."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import grpc
import pytest

from deployments.gateway_service import GatewayService
from deployments.store import RedisSessionStore
from sinkwire.v1 import streaming_llm_pb2 as pb
from tests.local_service import exchange
from tests.service import free_port

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

# Opened by a replica this (freshly started) gateway has never heard of.
SESSION_ID = "replica-before-restart." + "a" * 32


async def resume_status(redis_url: str) -> tuple[grpc.StatusCode, str]:
    """A fresh gateway (empty "recently gone" map) that routes to one live replica, asked to
    resume SESSION_ID."""
    store = RedisSessionStore(redis_url, ttl_s=60.0, timeout_s=0.5)
    gateway = GatewayService(store=store)
    port = free_port()
    server = await gateway.start("127.0.0.1", port)
    try:
        await gateway.update([{"replica_id": "live", "address": "127.0.0.1:1", "slots_free": 4}])
        resume = pb.Resume(session_id=SESSION_ID, resume_token="t")
        ended = await exchange(f"127.0.0.1:{port}", [pb.ClientMessage(resume=resume)])
        return ended.code, ended.details
    finally:
        await gateway.close()
        await server.stop(grace=None)
        await store.close()


@pytest.mark.parametrize("fault", ["killed", "frozen"])
async def test_a_restarted_gateway_says_unavailable_while_the_store_cannot_answer(
    redis_server: RedisServer, fault: str
) -> None:
    """Issue 19 defect 4: a restarted gateway answered NOT_FOUND (the conversation is gone for
    good) when its store lookup failed, while the docs promise UNAVAILABLE (try again)."""
    if fault == "killed":
        redis_server.kill()
    else:
        redis_server.process.send_signal(signal.SIGSTOP)
    try:
        code, details = await resume_status(redis_server.url)
    finally:
        if fault == "frozen":
            redis_server.process.send_signal(signal.SIGCONT)
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert "store" in details


async def test_a_gateway_says_not_found_when_the_store_says_the_session_is_gone(
    redis_server: RedisServer,
) -> None:
    code, details = await resume_status(redis_server.url)
    assert code == grpc.StatusCode.NOT_FOUND, (code, details)
