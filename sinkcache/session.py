"""Host-side session and request state, and the events a request produces.

A session is one endless token stream in one arena slot. Its stream is `cached` tokens in the slot
plus `pending` tokens accepted but not yet written (the last token of an append waits there, so the
next append or reply starts by feeding it and every appended token gets a next-token score).
Requests (appends) run one at a time per session, in order.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sinkcache.sampling import GenerationParams, SamplerVariant


class EngineError(Exception):
    """Base of the errors a caller can act on; each maps to one gRPC status."""


class SessionNotFoundError(EngineError):
    pass


class SessionExistsError(EngineError):
    pass


class InvalidRequestError(EngineError):
    pass


class EngineStoppedError(EngineError):
    pass


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


@dataclass(eq=False)  # identity: requests are tracked in sets
class Request:
    """One append: tokens to add to the stream, and maybe a reply to generate."""

    tokens: list[int]
    generation: GenerationParams | None
    score: bool
    sink: Any  # an output sink with push(event) (see engine.OutputSink)
    input: Any = None  # the AppendInput, encoded to `tokens` when the request becomes active
    chat: bool = False  # a chat turn: close a previous unfinished assistant reply first
    stream_start: int = 0  # stream position after the input (where the reply starts)
    max_chunk: int | None = None  # prefill at most this many tokens per step (default: window)
    # -- progress, owned by the engine thread ----------------------------------------------------
    feed: list[int] = field(default_factory=list)  # what to write into the slot
    targets: list[int] | None = None  # next token after each fed token (scores)
    fed: int = 0  # how many of `feed` are planned
    planned: int = 0  # reply tokens scheduled to be produced
    decode_steps: int = 0  # decode steps scheduled (each writes one reply token)
    emitted: int = 0
    last_token: int = -1
    cancelled: bool = False
    finished: bool = False
    variant: SamplerVariant = SamplerVariant.GREEDY
    decoder: Any = None  # incremental detokenizer for this reply
    text_tail: str = ""  # recent reply text, long enough to spot stop strings
    unsent: list[int] = field(default_factory=list)  # reply tokens not yet turned into an event
    unscored: int = 0  # scores still to arrive


class SessionState(enum.Enum):
    IDLE = "idle"
    PREFILL = "prefill"  # feeding the active request's tokens
    DECODE = "decode"  # generating
    DRAIN = "drain"  # no more steps planned; waiting for outputs in flight


@dataclass(eq=False)
class Session:
    session_id: str
    slot: int
    stream_base: int = 0  # stream position of the slot's first token
    cached: int = 0  # tokens written into the slot (as planned)
    pending: list[int] = field(default_factory=list)
    queue: deque[Request] = field(default_factory=deque)
    active: Request | None = None
    state: SessionState = SessionState.IDLE
    open_reply: int | None = None  # a reply a chat turn must close: its EOS token id, or -1
    closing: bool = False
    idle_waiters: list[Any] = field(default_factory=list)  # called with the session once idle

    @property
    def stream_pos(self) -> int:
        """Tokens in the stream so far (cached + pending)."""
        return self.stream_base + self.cached + len(self.pending)
