"""Translation between the sinkserve.v1 messages and the engine's types, and errors to statuses.

Torch-free: the replica's gRPC process imports it, and its engine may live in another process.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from sinkcache.errors import (
    ArenaFullError,
    EngineStoppedError,
    InvalidRequestError,
    SessionExistsError,
    SessionNotFoundError,
)
from sinkcache.events import EndReason, Event, ScoresEvent, TokensEvent, TurnEndEvent
from sinkcache.inputs import AppendInput, ChatTurn, GenerationParams, TextInput, TokenInput
from sinkwire.status import StreamError, one_line
from sinkwire.v1 import streaming_llm_pb2 as pb

DEFAULT_MAX_NEW_TOKENS = 256

_REASONS = {
    EndReason.EOS: pb.TurnEnd.EOS,
    EndReason.STOP: pb.TurnEnd.STOP,
    EndReason.LENGTH: pb.TurnEnd.LENGTH,
    EndReason.CANCELLED: pb.TurnEnd.CANCELLED,
    EndReason.APPENDED: pb.TurnEnd.APPENDED,
    EndReason.CLOSED: pb.TurnEnd.CLOSED,
}


def status_for(error: BaseException) -> StreamError:
    """The gRPC status a client gets for an engine error."""
    if isinstance(error, StreamError):
        return error
    if isinstance(error, DecodeError):  # bytes that are not a ClientMessage
        return StreamError(grpc.StatusCode.INVALID_ARGUMENT, "malformed client message")
    if isinstance(error, SessionNotFoundError):
        return StreamError(grpc.StatusCode.NOT_FOUND, str(error))
    if isinstance(error, ArenaFullError):
        return StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no free session slot: {error}")
    if isinstance(error, InvalidRequestError | ValueError):
        return StreamError(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, SessionExistsError):  # only a rebuild racing another: resume again
        return StreamError(grpc.StatusCode.UNAVAILABLE, f"the session is being rebuilt: {error}")
    if isinstance(error, EngineStoppedError):
        return StreamError(grpc.StatusCode.UNAVAILABLE, str(error))
    return StreamError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


def rejected_message(error: BaseException, stream_pos: int, replica_id: str) -> pb.ServerMessage:
    """The TurnEnd of an append refused on its own: nothing of it entered the stream."""
    detail = error.message if isinstance(error, StreamError) else one_line(str(error))
    return pb.ServerMessage(
        turn_end=pb.TurnEnd(reason=pb.TurnEnd.REJECTED, stream_position=stream_pos, detail=detail),
        replica_id=replica_id,
    )


def append_input(append: pb.Append) -> AppendInput:
    kind = append.WhichOneof("input")
    if kind == "text":
        return TextInput(append.text)
    if kind == "tokens":
        return TokenInput(tuple(append.tokens.ids))
    if kind == "chat":
        return ChatTurn(append.chat.role, append.chat.content)
    raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "append needs text, tokens or chat")


def generation_params(append: pb.Append) -> GenerationParams | None:
    if not append.HasField("generate"):
        return None
    g = append.generate
    return GenerationParams(
        max_new_tokens=g.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p if g.top_p != 0.0 else 1.0,
        seed=g.seed if g.HasField("seed") else None,
        stop=tuple(g.stop),
        ignore_eos=g.ignore_eos,
    )


def server_message(event: Event, replica_id: str) -> pb.ServerMessage:
    if isinstance(event, TokensEvent):
        return pb.ServerMessage(
            tokens=pb.Tokens(ids=event.ids, text=event.text, stream_position=event.stream_pos),
            replica_id=replica_id,
        )
    if isinstance(event, ScoresEvent):
        return pb.ServerMessage(
            scores=pb.Scores(logprobs=event.logprobs, first_position=event.first_pos),
            replica_id=replica_id,
        )
    assert isinstance(event, TurnEndEvent)
    return pb.ServerMessage(
        turn_end=pb.TurnEnd(
            reason=_REASONS[event.reason],
            input_tokens=event.input_tokens,
            generated_tokens=event.generated_tokens,
            stream_position=event.stream_pos,
            detail=event.detail,
        ),
        replica_id=replica_id,
    )
