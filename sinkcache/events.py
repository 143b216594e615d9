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
