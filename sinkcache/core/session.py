"""Host-side session and request state.

A session is one endless token stream in one arena slot. Its stream is `cached` tokens in the slot
plus `pending` tokens accepted but not yet written (the last token of an append waits there, so the
next append or reply starts by feeding it and every appended token gets a next-token score).
Requests (appends) run one at a time per session, in order.

Who writes what: the scheduler advances the schedule (`Session.cached`, `Session.state`,
`Request.fed / planned / decode_steps`); intake lays a request out (`feed`, `targets`,
`stream_start`); outputs shape what it produces (`emitted` and the reply-text fields); the engine
owns the rest. Each reads what others write, and no one writes another's fields.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sinkcache.core.sampling import SamplerVariant
from sinkcache.inputs import AppendInput, GenerationParams


class StreamTokens:
    """The ids a session's cache can hold, kept on the host as they enter the stream: the first
    `sink` forever, then the newest `window + 1` (the window plus a pending token). So the held
    ids of any session are known without reading the device."""

    __slots__ = ("_sink", "_window", "sinks", "tail")

    def __init__(self, sink: int, window: int) -> None:
        self._sink = sink
        self._window = window
        self.sinks: list[int] = []
        self.tail: deque[int] = deque(maxlen=window + 1)

    def extend(self, ids: list[int]) -> None:
        room = self._sink - len(self.sinks)
        if room > 0:
            self.sinks += ids[:room]
            ids = ids[room:]
        self.tail.extend(ids)

    def append(self, token: int) -> None:
        if len(self.sinks) < self._sink:
            self.sinks.append(token)
        else:
            self.tail.append(token)

    def held(self, pending: int) -> list[int]:
        """The ids the slot holds in cache order (sinks, then the ring oldest first), followed by
        the last `pending` ids, which are in the stream but not yet written."""
        tail = list(self.tail)
        return self.sinks + tail[max(0, len(tail) - self._window - pending) :]


@dataclass(eq=False)  # identity: requests are tracked in sets
class Request:
    """One append: tokens to add to the stream, and maybe a reply to generate."""

    input: AppendInput
    generation: GenerationParams | None
    score: bool
    sink: Any  # an output sink with push(event) and fail(error) (see core.outputs.OutputSink)
    chat: bool = False  # a chat turn: close a previous unfinished assistant reply first
    max_chunk: int | None = None  # prefill at most this many tokens per step (default: window)
    rebuild: bool = False  # feeds a restored session's snapshot (a bounded share of each step)
    # -- laid out by intake when the request becomes active ------------------------------------------
    tokens: list[int] = field(default_factory=list)  # the encoded input
    feed: list[int] = field(default_factory=list)  # what to write into the slot
    targets: list[int] | None = None  # next token after each fed token (scores)
    stream_start: int = 0  # stream position after the input (where the reply starts)
    variant: SamplerVariant = SamplerVariant.GREEDY
    # -- the schedule (scheduler) ----------------------------------------------------------------------
    fed: int = 0  # how many of `feed` are planned
    planned: int = 0  # reply tokens scheduled to be produced
    decode_steps: int = 0  # decode steps scheduled (each writes one reply token)
    # -- what it produced (outputs) -------------------------------------------------------------------
    emitted: int = 0
    last_token: int = -1
    decoder: Any = None  # incremental detokenizer for this reply
    text_tail: str = ""  # recent reply text, long enough to spot stop strings
    unsent: list[int] = field(default_factory=list)  # reply tokens not yet turned into an event
    # -- the engine -----------------------------------------------------------------------------------
    cancelled: bool = False
    finished: bool = False


class SessionState(enum.Enum):
    IDLE = "idle"
    PREFILL = "prefill"  # feeding the active request's tokens
    DECODE = "decode"  # generating
    DRAIN = "drain"  # no more steps planned; waiting for outputs in flight


@dataclass(eq=False)
class Session:
    session_id: str
    slot: int
    tokens: StreamTokens
    stream_base: int = 0  # stream position of the slot's first token
    cached: int = 0  # tokens written into the slot (as planned)
    pending: list[int] = field(default_factory=list)
    queue: deque[Request] = field(default_factory=deque)
    active: Request | None = None
    state: SessionState = SessionState.IDLE
    open_reply: int | None = None  # a reply a chat turn must close: its EOS token id, or -1
    closing: bool = False
    decode_held: bool = False  # its reader is behind: plan no decode rows (backpressure)
    idle_waiters: list[Any] = field(default_factory=list)  # called with the session once idle

    @property
    def stream_pos(self) -> int:
        """Tokens in the stream so far (cached + pending)."""
        return self.stream_base + self.cached + len(self.pending)
