"""What a request produces, in order: reply tokens, scores of appended tokens, and its end.

Plain data, torch-free: the engine makes them, the front ends (asyncio streams, the gRPC
service) read them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class EndReason(enum.StrEnum):
    EOS = "eos"  # the model emitted an end-of-sequence token
    STOP = "stop"  # a stop string appeared
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"
    APPENDED = "appended"  # no reply was asked for: the input is in the stream
    CLOSED = "closed"  # the session was closed while the request waited or ran


@dataclass
class TokensEvent:
    """Generated tokens (coalesced); `stream_pos` counts the stream through the last of them."""

    ids: list[int]
    text: str
    stream_pos: int


@dataclass
class ScoresEvent:
    """log p(token | stream before it) for appended tokens, starting at stream position `first_pos`."""

    logprobs: list[float]
    first_pos: int


@dataclass
class TurnEndEvent:
    reason: EndReason
    input_tokens: int
    generated_tokens: int
    stream_pos: int
    detail: str = ""


Event = TokensEvent | ScoresEvent | TurnEndEvent


@dataclass(frozen=True)
class SessionSnapshot:
    """Everything needed to rebuild a session elsewhere: the ids its cache holds then its pending
    ids (`tokens`, int32 bytes: at most sink + window + 1 of them), where its stream stands, and
    its chat state. A fresh session fed `tokens` holds exactly what a recomputation from those ids
    gives (sinkcache.core.engine.EngineCore.restore_session)."""

    session_id: str
    tokens: bytes  # array('i') bytes, native byte order
    stream_pos: int
    open_reply: int | None
