"""What a gateway checks before it routes a stream, and how it words what goes wrong after.

Before routing: the caller's API key (deployments/auth.py), the first message (it must parse, be
Open or Resume, and a Resume must name a well-formed session id), and the key's quotas
(deployments/quotas.py). While piping: a key with a tokens_per_s quota has its replies paced and
its appends held while its bucket is empty. After: a replica's status reaches the client as the
replica said it, but a status gRPC made up on the way (an unreachable address, a reset
connection) is logged with its detail and replaced by a stable message with no internal address
in it (deployments/internal.py says how the two are told apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from deployments.auth import KeyRing, Principal, authenticate
from deployments.internal import (
    FROM_REPLICA,
    NO_FREE_SLOT,
    error_kind,
    gateway_metadata,
    internal_token,
)
from deployments.quotas import GatewayQuotas
from deployments.settings import AppSettings
from deployments.tls import server_credentials
from sinkwire.session_ids import is_session_id
from sinkwire.status import StreamError, quoted
from sinkwire.v1 import streaming_llm_pb2 as pb

log = logging.getLogger(__name__)


class GatewayGuard:
    """Authentication, first-message checks, quotas, and error wording for one gateway."""

    @classmethod
    def from_settings(cls, settings: AppSettings) -> GatewayGuard:
        """The guard `settings` ask for (keys from `api_keys` or SINKSERVE_API_KEYS)."""
        return cls(
            keys=KeyRing.from_settings(settings.api_keys),
            internal_token=internal_token(settings.resume_secret),
            max_message_bytes=settings.max_message_bytes,
            quota_burst_s=settings.quota_burst_s,
        )

    def __init__(
        self,
        keys: KeyRing | None = None,  # None: a service without keys
        internal_token: str = "",
        max_message_bytes: int = 4 * 1024 * 1024,
        quota_burst_s: float = 10.0,
    ) -> None:
        self.keys = keys
        self.internal_token = internal_token
        self.max_message_bytes = max_message_bytes
        self.quotas = GatewayQuotas(quota_burst_s)

    # -- before routing --------------------------------------------------------------------------
    async def authenticate(self, context, admin: bool = False) -> Principal:
        principal = await authenticate(self.keys, context)
        if admin and not principal.admin:
            raise StreamError(grpc.StatusCode.PERMISSION_DENIED, "Stats needs an admin API key")
        return principal

    def first_message(self, raw: bytes, principal: Principal) -> pb.ClientMessage:
        """The stream's first message, checked (and counted against the key's sessions)."""
        try:
            first = pb.ClientMessage.FromString(raw)
        except DecodeError:
            raise StreamError(
                grpc.StatusCode.INVALID_ARGUMENT, "malformed client message"
            ) from None
        kind = first.WhichOneof("kind")
        if kind == "resume":
            session_id = first.resume.session_id
            if not session_id:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "resume needs a session_id")
            if not is_session_id(session_id):
                raise StreamError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"malformed session id {quoted(session_id)}"
                )
        elif kind == "open":
            self.quotas.admit_open(principal.name, principal.quota)
        else:
            raise StreamError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the first message of a stream must be open or resume",
            )
        return first

    def replica_metadata(self, principal: Principal) -> tuple[tuple[str, str], ...]:
        """Metadata of the gateway's call to a replica: the internal credential and the owner."""
        return gateway_metadata(self.internal_token, principal.name)

    # -- while piping ----------------------------------------------------------------------------
    def pacing(self, principal: Principal) -> Pacing | None:
        """The tokens_per_s pacing of one stream of `principal`'s (None: the key has no rate)."""
        bucket = self.quotas.bucket(principal.name, principal.quota)
        return None if bucket is None else Pacing(self.quotas, principal, bucket)

    # -- after -----------------------------------------------------------------------------------
    def moves_on(self, error: grpc.aio.AioRpcError) -> bool:
        """Whether a refusal before the replica's first answer sends the stream on to the next
        replica (nothing was created there): a replica that marked itself full, or one that is
        unavailable (draining, its engine gone, or unreachable). An unmarked RESOURCE_EXHAUSTED
        (a message over the size limit) is not a full replica."""
        return error_kind(error) == NO_FREE_SLOT or error.code() == grpc.StatusCode.UNAVAILABLE

    def client_status(
        self, error: grpc.aio.AioRpcError, replica_id: str
    ) -> tuple[grpc.StatusCode, str]:
        """What the client is told when a replica call ended with `error`."""
        code = error.code()
        if error_kind(error) in (FROM_REPLICA, NO_FREE_SLOT):
            return code, error.details() or code.name
        log.warning("replica %s: %s %s", replica_id, code.name, error.details())
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return code, f"a message was over the {self.max_message_bytes}-byte limit"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            log.error(
                "replica %s refused this gateway's credential: do they share one resume_secret?",
                replica_id,
            )
        return (
            grpc.StatusCode.UNAVAILABLE,
            f"the session's replica {replica_id} is unreachable; resume it later",
        )


class Pacing:
    """One stream under a tokens_per_s quota: replies are paced and appends held while the key's
    bucket is empty; an append that would wait past the bucket's depth ends the stream."""

    def __init__(self, quotas: GatewayQuotas, principal: Principal, bucket) -> None:
        self.quotas = quotas
        self.principal = principal
        self.bucket = bucket
        self.refusal: StreamError | None = None

    async def client_messages(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        name, quota = self.principal.name, self.principal.quota
        async for raw in requests:
            if _is_append(raw):
                try:
                    wait = self.quotas.admit_append(name, quota, self.bucket)
                except StreamError as error:
                    # Raising here makes gRPC cancel the replica call; `replies` says why.
                    self.refusal = error
                    raise
                if wait > 0:
                    await asyncio.sleep(wait)
            yield raw

    async def replies(self, responses: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(responses):
            try:
                async for raw in responses:
                    if (wait := self.bucket.wait_s()) > 0:
                        await asyncio.sleep(wait)  # the replica holds the session meanwhile
                    self.quotas.charge(self.principal.name, self.bucket, _tokens_in(raw))
                    yield raw
            except Exception:
                if self.refusal is not None:
                    raise self.refusal from None
                raise


def gateway_credentials(settings: AppSettings) -> grpc.ServerCredentials | None:
    """TLS for the gateway port, if the settings ask for it."""
    if not settings.tls_cert:
        return None
    return server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)


def _is_append(raw: bytes) -> bool:
    try:
        return pb.ClientMessage.FromString(raw).WhichOneof("kind") == "append"
    except DecodeError:
        return False  # the replica refuses it


def _tokens_in(raw: bytes) -> int:
    """Reply tokens and appended input tokens a server message accounts for."""
    try:
        message = pb.ServerMessage.FromString(raw)
    except DecodeError:
        return 0
    kind = message.WhichOneof("kind")
    if kind == "tokens":
        return len(message.tokens.ids)
    if kind == "turn_end":
        return message.turn_end.input_tokens
    return 0
