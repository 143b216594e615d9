"""The OpenAI-compatible HTTP door: POST /v1/responses, POST /v1/chat/completions, GET /v1/models
and GET /health, served by uvicorn in each gateway process on its own port.

Every request becomes a session stream through the gateway's own routing (in process:
deployments/openai_sessions.py), so keys, quotas, sticky routing and resume after a replica loss
are the gRPC door's, not a second copy. The field mapping and what is refused are in
docs/DEPLOYMENT.md; the shapes are deployments/openai_wire.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from deployments.auth import Principal
from deployments.gateway_service import GatewayService
from deployments.openai_sessions import (
    GatewayStream,
    Ledger,
    LocalLedger,
    _CallContext,
    chat_key,
    tip_key,
)
from deployments.openai_wire import (
    ApiError,
    ChatRequest,
    ResponseEvents,
    ResponseRef,
    ResponsesRequest,
    Turn,
    TurnResult,
    chat_chunk,
    chat_completion,
    chat_usage,
    error_for_status,
    finish_reason,
    model_list,
    new_id,
    parse_chat,
    parse_responses,
    response_object,
)
from sinkwire.status import StreamError
from sinkwire.v1 import streaming_llm_pb2 as pb

log = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"  # Ray Serve LLM's and SGLang's affinity header
CLOSE_TIMEOUT_S = 10.0  # a keyless chat session cut short is closed in the background within this


class OpenAIFront:
    """The HTTP API over one gateway service; `app` is the ASGI application."""

    def __init__(
        self,
        gateway: GatewayService,
        model: str,
        ledger: Ledger | None = None,
        max_body_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.gateway = gateway
        self.model = model
        self.ledger: Ledger = ledger or LocalLedger()
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.created = int(time.time())
        self._background: set[asyncio.Task] = set()
        routes = [
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: _http_error, ApiError: _api_error},
        )

    # -- common ----------------------------------------------------------------------------------
    async def _admit(self, request: Request) -> Principal:
        """The caller (401 without a valid key), unless the gateway is draining (503)."""
        if self.draining:
            raise ApiError(503, "this gateway is shutting down; retry", "server_error", "draining")
        try:
            return await self.gateway.guard.authenticate(_CallContext(_authorization(request)))
        except StreamError as error:
            raise error_for_status(error.code, error.message) from None

    async def _body(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"the request body is over {self.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise ApiError(413, f"the request body is over {self.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise ApiError(
                404,
                f"model {model[:80]!r} is not served here; this service serves {self.model!r}",
                code="model_not_found",
                param="model",
            )

    def _stream(self, request: Request) -> GatewayStream:
        return GatewayStream(self.gateway, _authorization(request))

    # -- GET -------------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        await self._admit(request)
        return JSONResponse(model_list(self.model, self.created))

    async def health(self, request: Request) -> Response:
        """200 while this gateway routes to at least one replica and is not draining."""
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.gateway.backends:
            return JSONResponse({"status": "no replica"}, status_code=503)
        return JSONResponse({"status": "ok", "replicas": len(self.gateway.backends)})

    # -- POST /v1/responses ----------------------------------------------------------------------
    async def responses(self, request: Request) -> Response:
        await self._admit(request)
        req = parse_responses(await self._body(request))
        self._check_model(req.model)
        stream = self._stream(request)
        try:
            result = await self._begin_response(stream, req)
        except BaseException:
            await stream.aclose()
            raise
        ref = ResponseRef(result.session_id, stream.opened.resume_token, result.start)
        response_id, item_id = ref.response_id(), new_id("msg_")
        if req.stream:
            events = ResponseEvents(req, response_id, item_id)
            return _sse(self._response_events(stream, req, result, events), named=True)
        try:
            async for _ in stream.turn(result, appended=len(req.turns) - 1):
                pass
            await stream.finish()
        finally:
            await stream.aclose()
        await self._record_tip(result)
        return JSONResponse(response_object(req, response_id, int(time.time()), result, item_id))

    async def _begin_response(self, stream: GatewayStream, req: ResponsesRequest) -> TurnResult:
        """Open (or resume, checking that the previous response is the session's latest) and
        send the input; the result so far."""
        if req.previous is None:
            opened = await stream.start(pb.ClientMessage(open=pb.Open()))
        else:
            opened = await self._resume_previous(stream, req)
        result = TurnResult(
            start=opened.stream_position,
            end=opened.stream_position,
            session_id=opened.session_id,
            rebuilt=opened.rebuilt,
        )
        # This response is now the session's latest: the previous one cannot be continued twice.
        await self.ledger.put(tip_key(opened.session_id), {"start": result.start, "end": None})
        _send(stream, req.turns, req.sampling.params())
        return result

    async def _resume_previous(self, stream: GatewayStream, req: ResponsesRequest) -> pb.Opened:
        ref = req.previous
        assert ref is not None
        resume = pb.Resume(session_id=ref.session_id, resume_token=ref.resume_token)
        try:
            opened = await stream.start(pb.ClientMessage(resume=resume))
        except ApiError as error:
            if error.status in (403, 404):  # unknown, expired, or another key's
                raise ApiError(
                    404,
                    f"response {req.previous_response_id[:60]!r} not found (unknown, expired, "
                    "or another API key's)",
                    code="response_not_found",
                    param="previous_response_id",
                ) from None
            raise
        tip = await self.ledger.get(tip_key(ref.session_id))
        position = opened.stream_position
        if tip is not None and tip["start"] != ref.start:
            raise ApiError(
                409,
                "previous_response_id is not the latest response of its session: a session is "
                "one live stream, so only its latest response can be continued",
                code="response_superseded",
                param="previous_response_id",
            )
        expected = tip["end"] if tip is not None and tip["end"] is not None else None
        if (expected is not None and position != expected) or position < ref.start:
            raise ApiError(
                409,
                f"the session stands at position {position}, not where that response ended "
                f"({expected if expected is not None else 'unknown'}): it cannot be continued",
                code="response_superseded",
                param="previous_response_id",
            )
        return opened

    async def _record_tip(self, result: TurnResult) -> None:
        await self.ledger.put(
            tip_key(result.session_id), {"start": result.start, "end": result.end}
        )

    async def _response_events(
        self,
        stream: GatewayStream,
        req: ResponsesRequest,
        result: TurnResult,
        events: ResponseEvents,
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            for event in events.opening():
                yield event
            async for text in stream.turn(result, appended=len(req.turns) - 1):
                yield events.delta(text)
            await stream.finish()
            await self._record_tip(result)
            for event in events.closing(result):
                yield event
        except ApiError as error:
            yield events.failed(error)
        finally:
            self._close_later(stream, keyless=False)  # not awaited: the client may be gone

    # -- POST /v1/chat/completions ---------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        principal = await self._admit(request)
        req = parse_chat(await self._body(request))
        self._check_model(req.model)
        key = request.headers.get(SESSION_HEADER) or req.user
        ledger_key = chat_key(principal.name, key) if key else None
        entry = await self.ledger.get(ledger_key) if ledger_key else None
        new_turns = req.turns
        if entry is not None:
            new_turns = req.turns[_consumed_prefix(req.turns, entry["digests"], key) :]
        stream = self._stream(request)
        try:
            stream, opened, new_turns, entry = await self._begin_chat(
                request, stream, req, entry, new_turns
            )
        except BaseException:
            await stream.aclose()
            raise
        _send(stream, new_turns, req.sampling.params())
        result = TurnResult(
            start=opened.stream_position,
            end=opened.stream_position,
            session_id=opened.session_id,
            rebuilt=opened.rebuilt,
        )
        consumed = (entry["digests"] if entry else []) + [t.digest() for t in new_turns]

        async def done() -> None:
            """After the reply: the key's session remembers it; a keyless one is closed."""
            if ledger_key is None:
                await stream.close_session()
                return
            await stream.finish()
            reply = Turn("assistant", result.text).digest()
            await self.ledger.put(
                ledger_key,
                {
                    "session_id": opened.session_id,
                    "resume_token": opened.resume_token,
                    "end": result.end,
                    "digests": [*consumed, reply],
                },
            )

        completion_id, created = new_id("chatcmpl-"), int(time.time())
        appended = len(new_turns) - 1
        if req.stream:
            chunks = self._chat_chunks(
                stream, req, result, appended, done, completion_id, created, key is None
            )
            return _sse(chunks, named=False)
        try:
            async for _ in stream.turn(result, appended):
                pass
            await done()
        except BaseException:
            self._close_later(stream, key is None)
            raise
        await stream.aclose()
        return JSONResponse(chat_completion(completion_id, created, req.model, result))

    async def _begin_chat(
        self,
        request: Request,
        stream: GatewayStream,
        req: ChatRequest,
        entry: dict[str, Any] | None,
        new_turns: list[Turn],
    ) -> tuple[GatewayStream, pb.Opened, list[Turn], dict[str, Any] | None]:
        """Resume the key's session (a new stream and session when it expired), or open one."""
        if entry is not None:
            resume = pb.Resume(session_id=entry["session_id"], resume_token=entry["resume_token"])
            try:
                opened = await stream.start(pb.ClientMessage(resume=resume))
            except ApiError as error:
                if error.status != 404:
                    raise
                # The key's session expired: a new one consumes the whole conversation.
                await stream.aclose()
                fresh = self._stream(request)
                try:
                    opened = await fresh.start(pb.ClientMessage(open=pb.Open()))
                except BaseException:
                    await fresh.aclose()
                    raise
                return fresh, opened, req.turns, None
            else:
                if opened.stream_position != entry["end"]:
                    raise ApiError(
                        409,
                        f"the session of this key stands at position {opened.stream_position}, "
                        f"not where its last reply ended ({entry['end']}): another request used "
                        "it at the same time, or it lost its last reply in a failover",
                        code="conversation_conflict",
                    )
                return stream, opened, new_turns, entry
        return stream, await stream.start(pb.ClientMessage(open=pb.Open())), new_turns, entry

    async def _chat_chunks(
        self,
        stream: GatewayStream,
        req: ChatRequest,
        result: TurnResult,
        appended: int,
        done,
        completion_id: str,
        created: int,
        keyless: bool,
    ) -> AsyncIterator[dict[str, Any] | str]:
        finished = False
        try:
            yield chat_chunk(
                completion_id, created, req.model, {"role": "assistant", "content": ""}
            )
            async for text in stream.turn(result, appended):
                yield chat_chunk(completion_id, created, req.model, {"content": text})
            await done()
            finished = True
            yield chat_chunk(completion_id, created, req.model, {}, finish_reason(result))
            if req.include_usage:
                yield chat_chunk(completion_id, created, req.model, None, usage=chat_usage(result))
            yield "[DONE]"
        except ApiError as error:
            yield error.body()
        finally:  # not awaited: the client may be gone
            self._close_later(stream, keyless and not finished)

    def _close_later(self, stream: GatewayStream, keyless: bool) -> None:
        """A request cut short: a keyless session is closed (it lived for this request only),
        in the background so the client's cancellation does not stop it; a keyed one stays."""

        async def close() -> None:
            try:
                if keyless:
                    await asyncio.wait_for(stream.close_session(), CLOSE_TIMEOUT_S)
            except Exception:
                log.debug("closing a cut-short keyless session failed", exc_info=True)
            finally:
                await stream.aclose()

        task = asyncio.ensure_future(close())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _authorization(request: Request) -> str | None:
    return request.headers.get("authorization")


def _send(stream: GatewayStream, turns: list[Turn], generate: pb.GenerationParams) -> None:
    """Every turn into the session, the last one asking for the reply."""
    for turn in turns[:-1]:
        stream.append(turn.role, turn.content, None)
    last = turns[-1]
    stream.append(last.role, last.content, generate)


def _consumed_prefix(turns: list[Turn], digests: list[str], key: str) -> int:
    """How many of `turns` the key's session consumed already; ApiError 400 unless the request
    extends exactly that conversation with at least one new message."""
    for index, (turn, digest) in enumerate(zip(turns, digests, strict=False)):
        if turn.digest() != digest:
            raise ApiError(
                400,
                f"messages[{index}] is not the message session key {key[:40]!r} consumed there: "
                "send the conversation it holds plus new messages, or use a new session key",
                code="conversation_mismatch",
                param=f"messages[{index}]",
            )
    if len(turns) <= len(digests):
        raise ApiError(
            400,
            f"session key {key[:40]!r} has consumed {len(digests)} messages; this request has "
            f"{len(turns)}: it must add at least one new message",
            code="conversation_mismatch",
            param="messages",
        )
    return len(digests)


def _sse(events: AsyncIterator[dict[str, Any] | str], named: bool) -> StreamingResponse:
    """Server-sent events: `event: <type>` lines for the Responses API, bare `data:` for chat."""

    async def body() -> AsyncIterator[bytes]:
        async for event in events:
            if isinstance(event, str):
                yield f"data: {event}\n\n".encode()
                continue
            data = json.dumps(event, separators=(",", ":"))
            kind = event.get("type", "error") if named else None
            yield (f"event: {kind}\ndata: {data}\n\n" if kind else f"data: {data}\n\n").encode()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    headers = {"retry-after": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    kind = "not_found" if error.status_code == 404 else "invalid_request"
    message = f"{request.method} {request.url.path}: {error.detail}"
    return await _api_error(request, ApiError(error.status_code, message, code=kind))


# -- serving ---------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    def capture_signals(self):  # the process's signals are its host's (Ray, a launcher)
        return contextlib.nullcontext()


class HttpDoor:
    """uvicorn serving an OpenAIFront on host:port (TLS and mTLS from the gateway's files)."""

    def __init__(self, front: OpenAIFront) -> None:
        self.front = front
        self.server: _Server | None = None
        self.task: asyncio.Task | None = None
        self.port = 0

    async def start(
        self,
        host: str,
        port: int,
        reuse_port: bool = False,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_client_ca: str | None = None,
    ) -> int:
        """Listen (port 0: any free one); the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise RuntimeError(f"cannot listen on {host}:{port} (HTTP): {error}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        tls: dict[str, Any] = {}
        if tls_cert:
            tls = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key}
            if tls_client_ca:
                tls.update(ssl_ca_certs=tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            self.front.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
            **tls,
        )
        self.server = _Server(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)
        if self.task.done():
            self.task.result()  # raises why it did not start
            raise RuntimeError("the HTTP server stopped as it started")
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new requests (503), let those in flight finish for `grace_s`, then stop."""
        self.front.draining = True
        if self.server is None or self.task is None:
            return
        self.server.config.timeout_graceful_shutdown = grace_s
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, grace_s + 5)
