"""How the HTTP front drives a session: through the gateway's own gRPC routing, in process.

`GatewayStream` hands the gateway's Session handler a request stream and a call context made from
the HTTP request (its Authorization header), so an HTTP request is routed, authenticated,
quota-checked, paced and resumed exactly like a gRPC stream, with no socket in between.

`Ledger` keeps what the HTTP API needs beyond a session's own state, shared by every gateway of
the application (the replica directory keeps it; one process keeps it without Ray): which response
is the latest of each session (only that one can be continued), and which session a chat key
(x-session-id, or `user`) names with the digests of the messages it consumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc

from deployments.gateway_service import GatewayService
from deployments.openai_wire import ApiError, TurnResult, error_for_status
from sinkwire.status import StreamError
from sinkwire.v1 import streaming_llm_pb2 as pb

LEDGER_ENTRIES = 100_000  # kept per application (oldest dropped first)


class _CallContext:
    """What GatewayService.session reads of a gRPC call context, from an HTTP request."""

    def __init__(self, authorization: str | None) -> None:
        self._metadata = (("authorization", authorization),) if authorization else ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str, *args: Any) -> None:
        raise StreamError(code, details)


class GatewayStream:
    """One session stream through the gateway: `start` opens or resumes, `append` adds turns,
    `turn` reads one generated reply, `finish` half-closes (the session lives on), `close` ends
    the session. Every gRPC status becomes an ApiError."""

    def __init__(self, gateway: GatewayService, authorization: str | None) -> None:
        self._outbox: asyncio.Queue[pb.ClientMessage | None] = asyncio.Queue()
        self._replies = gateway.session(self._requests(), _CallContext(authorization))
        self.opened: pb.Opened | None = None
        self.replica_id = ""

    async def _requests(self) -> AsyncIterator[bytes]:
        while (message := await self._outbox.get()) is not None:
            yield message.SerializeToString()

    async def _next(self) -> pb.ServerMessage | None:
        try:
            raw = await anext(self._replies, None)
        except StreamError as error:
            raise error_for_status(error.code, error.message) from None
        if raw is None:
            return None
        message = pb.ServerMessage.FromString(raw)
        self.replica_id = message.replica_id or self.replica_id
        return message

    async def start(self, first: pb.ClientMessage) -> pb.Opened:
        self._outbox.put_nowait(first)
        message = await self._next()
        if message is None or message.WhichOneof("kind") != "opened":
            raise ApiError(502, "the session stream ended before it opened", "server_error")
        self.opened = message.opened
        return self.opened

    def append(self, role: str, content: str, generate: pb.GenerationParams | None) -> None:
        append = pb.Append(chat=pb.ChatTurn(role=role, content=content))
        if generate is not None:
            append.generate.CopyFrom(generate)
        self._outbox.put_nowait(pb.ClientMessage(append=append))

    async def turn(self, result: TurnResult, appended: int) -> AsyncIterator[str]:
        """The reply's text as it comes; `result` is filled in as the turns end (the `appended`
        turns sent before the generating one, then the reply's own)."""
        ends = 0
        while True:
            message = await self._next()
            if message is None:
                raise ApiError(502, "the session stream ended mid-reply", "server_error")
            kind = message.WhichOneof("kind")
            if kind == "tokens":
                if message.tokens.text:
                    yield message.tokens.text
                result.text += message.tokens.text
                result.output_tokens += len(message.tokens.ids)
            elif kind == "turn_end":
                end = message.turn_end
                if end.reason == pb.TurnEnd.REJECTED:
                    raise ApiError(400, end.detail or "the input was refused", code="invalid_value")
                result.input_tokens += end.input_tokens
                result.end = end.stream_position
                ends += 1
                if ends > appended:
                    result.reason = end.reason
                    result.output_tokens = end.generated_tokens
                    result.replica_id = self.replica_id
                    return

    async def finish(self) -> None:
        """Half-close: the replica ends the stream after the last reply; the session stays."""
        self._outbox.put_nowait(None)
        while await self._next() is not None:
            pass

    async def close_session(self) -> None:
        self._outbox.put_nowait(pb.ClientMessage(close=pb.Close()))
        self._outbox.put_nowait(None)
        while await self._next() is not None:
            pass

    async def aclose(self) -> None:
        """Let go of the stream (a request that failed or a client that left)."""
        with contextlib.suppress(Exception):
            await self._replies.aclose()


# -- the ledger -----------------------------------------------------------------------------------
class Ledger(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def put(self, key: str, value: dict[str, Any]) -> None: ...


class LocalLedger:
    """The ledger in this process (one gateway, or the directory actor's copy for all of them);
    an entry lives `ttl_s` past its last write, like the session it describes."""

    def __init__(self, ttl_s: float = 3600.0, max_entries: int = LEDGER_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def get_now(self, key: str) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if time.monotonic() > entry[0]:
            del self._entries[key]
            return None
        return entry[1]

    def put_now(self, key: str, value: dict[str, Any], ttl_s: float | None = None) -> None:
        self._entries[key] = (time.monotonic() + (ttl_s or self.ttl_s), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def get(self, key: str) -> dict[str, Any] | None:
        return self.get_now(key)

    async def put(self, key: str, value: dict[str, Any]) -> None:
        self.put_now(key, value)


def tip_key(session_id: str) -> str:
    return f"tip:{session_id}"


def chat_key(owner: str, key: str) -> str:
    return f"chat:{owner}\x00{key}"
