"""Ask a sinkserve endpoint whether it is serving (grpc.health.v1)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sinkwire.channels import Credentials, sync_channel


def is_serving(
    target: str, service: str = "", timeout_s: float = 2.0, credentials: Credentials | None = None
) -> bool:
    with sync_channel(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def replica_count(
    target: str, timeout_s: float = 2.0, credentials: Credentials | None = None
) -> int:
    """How many session replicas the gateway at `target` can reach (the Stats RPC, which needs an
    admin key on a service with keys)."""
    from sinkwire.v1 import streaming_llm_pb2 as pb
    from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

    with sync_channel(target, credentials) as channel:
        try:
            stats = pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return 0
    return len(stats.replicas)


def wait_serving(
    target: str,
    replicas: int = 1,
    timeout_s: float = 120.0,
    credentials: Credentials | None = None,
) -> None:
    """Block until `target` reports SERVING with `replicas` replicas behind it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (
            is_serving(target, credentials=credentials)
            and replica_count(target, credentials=credentials) >= replicas
        ):
            return
        time.sleep(0.25)
    raise TimeoutError(f"{target} was not serving {replicas} replica(s) within {timeout_s:.0f} s")
