"""The OpenAI HTTP API's shapes, and how they map onto a session: request parsing (what is taken,
what is refused), response ids, the Responses and Chat Completions objects and their streaming
events, and the error body. No I/O and no Ray here: deployments/openai_front.py serves them.

A response id names its session, the session's resume token and the stream position the response
began at (`resp_` + base64url), so any gateway can route a `previous_response_id` like a gRPC
Resume, and the replica's own token check decides whether the caller's key may continue it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from sinkwire.session_ids import is_session_id
from sinkwire.v1 import streaming_llm_pb2 as pb

RESPONSE_ID_PREFIX = "resp_"
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a request names none (the proto's 0 is greedy)
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


# gRPC status -> (HTTP status, OpenAI error type, code)
_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.ABORTED: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
}


def error_for_status(code: grpc.StatusCode, message: str) -> ApiError:
    """The HTTP error for a gRPC status the gateway or a replica ended a stream with."""
    status, kind, api_code = _STATUS.get(code, (500, "server_error", "internal_error"))
    return ApiError(status, message, kind, api_code)


def unsupported(name: str) -> ApiError:
    return ApiError(
        400,
        f"unsupported parameter {name!r}: sinkserve does not implement it (see docs/DEPLOYMENT.md)",
        code="unsupported_parameter",
        param=name,
    )


# -- response ids ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResponseRef:
    """What a response id names: a session, its resume token, and where the response began."""

    session_id: str
    resume_token: str
    start: int

    def response_id(self) -> str:
        raw = f"{self.session_id}:{self.resume_token}:{self.start}".encode()
        return RESPONSE_ID_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_response_id(response_id: str) -> ResponseRef:
    """The reference in a response id; ApiError 404 for anything that is not one of ours."""
    not_found = ApiError(
        404,
        f"response {response_id[:60]!r} not found",
        code="response_not_found",
        param="previous_response_id",
    )
    if not response_id.startswith(RESPONSE_ID_PREFIX) or len(response_id) > 400:
        raise not_found
    body = response_id[len(RESPONSE_ID_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        session_id, token, start = raw.split(":")
        ref = ResponseRef(session_id, token, int(start))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise not_found from None
    if not is_session_id(ref.session_id) or not ref.resume_token or ref.start < 0:
        raise not_found
    return ref


# -- requests --------------------------------------------------------------------------------------
@dataclass
class Turn:
    """One input message as a chat turn of the session."""

    role: str
    content: str

    def digest(self) -> str:
        """What the session remembers of a consumed message (for the chat prefix check)."""
        return hashlib.sha256(f"{self.role}\x00{self.content}".encode()).hexdigest()[:32]


@dataclass
class Sampling:
    max_new_tokens: int = 0  # 0: the server default
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def params(self) -> pb.GenerationParams:
        params = pb.GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
        )
        if self.seed is not None:
            params.seed = self.seed
        return params


@dataclass
class ResponsesRequest:
    model: str
    turns: list[Turn]
    sampling: Sampling
    stream: bool
    previous: ResponseRef | None
    previous_response_id: str | None
    instructions: str | None
    metadata: dict[str, Any]


@dataclass
class ChatRequest:
    model: str
    turns: list[Turn]
    sampling: Sampling
    stream: bool
    include_usage: bool
    user: str | None


_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}

# Fields a request may carry that change nothing here (null or these values are fine).
_RESPONSES_TAKEN = {
    "model", "input", "instructions", "previous_response_id", "max_output_tokens", "temperature",
    "top_p", "stream", "stop", "seed", "metadata", "user", "store",
}  # fmt: skip
_CHAT_TAKEN = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "stream", "stream_options", "stop", "seed", "user", "n", "store", "metadata",
}  # fmt: skip


def _refuse_unknown(body: dict[str, Any], taken: set[str]) -> None:
    for name, value in body.items():
        if name not in taken and value is not None:
            raise unsupported(name)


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number in [{low:g}, {high:g}]", param=name)
    return float(value)


def _count(body: dict, names: tuple[str, ...]) -> int:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"{name} must be a positive integer", param=name)
        return value
    return 0


def _sampling(body: dict, max_names: tuple[str, ...]) -> Sampling:
    top_p = _number(body, "top_p", 0.0, 1.0, 0.0)
    if body.get("top_p") is not None and top_p == 0.0:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > MAX_STOP_STRINGS
    ):
        raise ApiError(
            400,
            f"stop must be a string or up to {MAX_STOP_STRINGS} non-empty strings",
            param="stop",
        )
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ApiError(400, "seed must be a non-negative integer", param="seed")
    return Sampling(
        max_new_tokens=_count(body, max_names),
        temperature=_number(body, "temperature", 0.0, 2.0, DEFAULT_TEMPERATURE),
        top_p=top_p,
        seed=seed,
        stop=stop or [],
    )


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (GET /v1/models names it)", param="model")
    return model


def _text_of(content: Any, param: str, part_types: tuple[str, ...]) -> str:
    """A message's content as text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in part_types:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(
                    400,
                    f"content part type {kind!r} is not supported (text parts only)",
                    code="unsupported_content",
                    param=param,
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ApiError(400, "content must be a string or a list of text parts", param=param)


def _turn(item: Any, param: str, part_types: tuple[str, ...]) -> Turn:
    if not isinstance(item, dict):
        raise ApiError(400, "each message must be an object with role and content", param=param)
    if item.get("type", "message") != "message":
        raise ApiError(
            400,
            f"input item type {item.get('type')!r} is not supported (messages only)",
            code="unsupported_content",
            param=param,
        )
    role = _ROLES.get(item.get("role"))
    if role is None:
        raise ApiError(
            400, f"role must be one of {', '.join(_ROLES)}, got {item.get('role')!r}", param=param
        )
    for name in item:
        if name not in ("role", "content", "type", "id", "status", "name"):
            raise unsupported(f"{param}.{name}")
    return Turn(role, _text_of(item.get("content"), f"{param}.content", part_types))


def parse_responses(body: Any) -> ResponsesRequest:
    """A POST /v1/responses body, checked; ApiError 400 for what cannot be served."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_unknown(body, _RESPONSES_TAKEN)
    if body.get("store") is False:
        raise ApiError(
            400,
            "store=false is not supported: every response continues a live session",
            code="unsupported_value",
            param="store",
        )
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        turns = [Turn("user", raw_input)]
    elif isinstance(raw_input, list) and raw_input:
        turns = [
            _turn(item, f"input[{i}]", ("input_text", "output_text", "text"))
            for i, item in enumerate(raw_input)
        ]
    else:
        raise ApiError(400, "input must be a string or a non-empty list of messages", param="input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, "instructions must be a string", param="instructions")
    if instructions:
        turns.insert(0, Turn("system", instructions))
    previous_id = body.get("previous_response_id")
    if previous_id is not None and not isinstance(previous_id, str):
        raise ApiError(400, "previous_response_id must be a string", param="previous_response_id")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ApiError(400, "metadata must be an object", param="metadata")
    return ResponsesRequest(
        model=_model(body),
        turns=turns,
        sampling=_sampling(body, ("max_output_tokens",)),
        stream=bool(body.get("stream")),
        previous=parse_response_id(previous_id) if previous_id else None,
        previous_response_id=previous_id,
        instructions=instructions,
        metadata=metadata,
    )


def parse_chat(body: Any) -> ChatRequest:
    """A POST /v1/chat/completions body, checked; ApiError 400 for what cannot be served."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_unknown(body, _CHAT_TAKEN)
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1 (one session, one reply)", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns = [_turn(m, f"messages[{i}]", ("text",)) for i, m in enumerate(messages)]
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "stream_options takes include_usage only", param="stream_options")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not user):
        raise ApiError(400, "user must be a non-empty string", param="user")
    return ChatRequest(
        model=_model(body),
        turns=turns,
        sampling=_sampling(body, ("max_completion_tokens", "max_tokens")),
        stream=bool(body.get("stream")),
        include_usage=bool(options.get("include_usage")),
        user=user,
    )


# -- what a turn produced --------------------------------------------------------------------------
@dataclass
class TurnResult:
    """One generated reply, as the session reported it."""

    text: str = ""
    input_tokens: int = 0  # every appended turn's tokens (chat formatting included)
    output_tokens: int = 0
    reason: int = pb.TurnEnd.REASON_UNSPECIFIED
    start: int = 0  # stream position before the request's first input
    end: int = 0  # stream position after the reply
    session_id: str = ""
    replica_id: str = ""
    rebuilt: bool = False

    @property
    def truncated(self) -> bool:
        return self.reason == pb.TurnEnd.LENGTH

    def position(self) -> dict[str, Any]:
        """sinkserve's extension field: where the response sits in its session."""
        return {
            "session_id": self.session_id,
            "start_position": self.start,
            "end_position": self.end,
            "replica_id": self.replica_id,
            "rebuilt": self.rebuilt,
        }


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


# -- Responses objects -----------------------------------------------------------------------------
def output_message(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content if status != "in_progress" else [],
    }


def response_object(
    request: ResponsesRequest,
    response_id: str,
    created_at: int,
    result: TurnResult | None,
    item_id: str,
) -> dict[str, Any]:
    """A Response: in progress while `result` is None, else completed (or incomplete)."""
    if result is None:
        status, output, usage, incomplete = "in_progress", [], None, None
    else:
        status = "incomplete" if result.truncated else "completed"
        output = [output_message(item_id, result.text, status)]
        usage = {
            "input_tokens": result.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": result.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": result.input_tokens + result.output_tokens,
        }
        incomplete = {"reason": "max_output_tokens"} if result.truncated else None
    sampling = request.sampling
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": request.instructions,
        "max_output_tokens": sampling.max_new_tokens or None,
        "model": request.model,
        "output": output,
        "parallel_tool_calls": False,
        "previous_response_id": request.previous_response_id,
        "store": True,
        "temperature": sampling.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": "none",
        "tools": [],
        "top_p": sampling.top_p or 1.0,
        "truncation": "disabled",
        "usage": usage,
        "metadata": request.metadata,
    }
    if result is not None:
        body["sinkserve"] = result.position()
    return body


class ResponseEvents:
    """The Responses streaming events of one response, numbered in order."""

    def __init__(self, request: ResponsesRequest, response_id: str, item_id: str) -> None:
        self.request = request
        self.response_id = response_id
        self.item_id = item_id
        self.created_at = int(time.time())
        self.sequence = 0
        self.text: list[str] = []

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _response(self, result: TurnResult | None) -> dict[str, Any]:
        return response_object(
            self.request, self.response_id, self.created_at, result, self.item_id
        )

    def opening(self) -> list[dict[str, Any]]:
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return [
            self._event("response.created", response=self._response(None)),
            self._event("response.in_progress", response=self._response(None)),
            self._event(
                "response.output_item.added",
                output_index=0,
                item=output_message(self.item_id, "", "in_progress"),
            ),
            self._event("response.content_part.added", part=part, **where),
        ]

    def delta(self, text: str) -> dict[str, Any]:
        self.text.append(text)
        return self._event(
            "response.output_text.delta",
            item_id=self.item_id,
            output_index=0,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def closing(self, result: TurnResult) -> list[dict[str, Any]]:
        text = result.text
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        status = "incomplete" if result.truncated else "completed"
        return [
            self._event("response.output_text.done", text=text, logprobs=[], **where),
            self._event("response.content_part.done", part=part, **where),
            self._event(
                "response.output_item.done",
                output_index=0,
                item=output_message(self.item_id, text, status),
            ),
            self._event(f"response.{status}", response=self._response(result)),
        ]

    def failed(self, error: ApiError) -> dict[str, Any]:
        response = self._response(None)
        response["status"] = "failed"
        response["error"] = {"code": error.code or "server_error", "message": error.message}
        return self._event("response.failed", response=response)


# -- Chat Completions objects ----------------------------------------------------------------------
def finish_reason(result: TurnResult) -> str:
    return "length" if result.truncated else "stop"


def chat_usage(result: TurnResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.input_tokens,
        "completion_tokens": result.output_tokens,
        "total_tokens": result.input_tokens + result.output_tokens,
    }


def chat_completion(
    completion_id: str, created: int, model: str, result: TurnResult
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": finish_reason(result),
                "logprobs": None,
            }
        ],
        "usage": chat_usage(result),
        "sinkserve": result.position(),
    }


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    )
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def model_list(model: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "sinkserve"}],
    }
