"""What only gateways may say to a replica, and what a replica tells a gateway about its errors.

A replica's gRPC port serves gateways, never clients: every call must carry the cluster-internal
credential (`sinkserve-internal` metadata), an HMAC under the application's resume secret that no
client is ever given (clients get resume tokens, HMACs of session ids, which cannot collide with
it: the message differs). With it, the gateway says which API key a stream speaks for
(`sinkserve-owner`). Health checks stay open (Serve and Kubernetes probes).

The other way, a replica marks the statuses it ends streams with in trailing metadata
(`sinkserve-error`), so a gateway can tell them from transport failures: "no-free-slot" (the next
replica may have room), "replica" (any other status of ours: pass it on as it is). A status
without a mark came from gRPC itself (an unreachable address, a reset connection) and its text,
which names internal addresses, is logged and replaced.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence

import grpc

log = logging.getLogger(__name__)

INTERNAL_KEY = "sinkserve-internal"
OWNER_KEY = "sinkserve-owner"
ERROR_KEY = "sinkserve-error"
NO_FREE_SLOT = "no-free-slot"
FROM_REPLICA = "replica"
_OPEN_METHODS = ("/grpc.health.v1.Health/",)


def internal_token(resume_secret: str) -> str:
    """The credential gateways present to replicas, derived from the application's secret."""
    return hmac.new(resume_secret.encode(), b"sinkserve internal v1", hashlib.sha256).hexdigest()


def gateway_metadata(token: str, owner: str) -> tuple[tuple[str, str], ...]:
    """What a gateway sends with every call to a replica."""
    return ((INTERNAL_KEY, token), (OWNER_KEY, owner))


def metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


def error_mark(kind: str) -> tuple[tuple[str, str], ...]:
    return ((ERROR_KEY, kind),)


def error_kind(error: grpc.aio.AioRpcError) -> str | None:
    """The replica's mark on a status, or None for a status gRPC made up (transport)."""
    return metadata_value(error.trailing_metadata(), ERROR_KEY)


class GatewaysOnly(grpc.aio.ServerInterceptor):
    """A replica's server interceptor: calls without the internal credential are refused with
    UNAUTHENTICATED before any handler runs (health checks excepted)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(_OPEN_METHODS):
            return await continuation(details)
        presented = metadata_value(details.invocation_metadata, INTERNAL_KEY) or ""
        if hmac.compare_digest(presented.encode(), self._token):
            return await continuation(details)
        log.warning("refused a call to %s without the internal credential", details.method)
        handler = await continuation(details)
        return None if handler is None else _refusing(handler)


_REFUSAL = "this port serves sinkserve gateways only; connect to a gateway"


async def _refuse(request, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)


async def _refuse_streaming(request, context):
    if hasattr(request, "__aiter__"):  # take the first message, so that the caller's write does
        await anext(aiter(request), None)  # not race the refusal (its library says INTERNAL)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)
    yield  # never reached: makes this an async generator, as streaming handlers are


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.response_streaming:
        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return make(_refuse_streaming)
    make = (
        grpc.stream_unary_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(_refuse)
