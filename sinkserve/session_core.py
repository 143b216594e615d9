"""What a sinkserve session client knows and decides, without doing any I/O (sans-IO).

`SessionCore` holds one session's state across its streams (its id and resume token, the stream
position seen, how often it resumed, whether it was dropped) and answers the questions a client
asks on each event: which message starts the next stream, is this first reply an Opened, what
does a server message say about the stream position, and, when a stream breaks, whether and when
to try a new one (`Recovery`, per `ResumePolicy`). The blocking `Session` and the asyncio
`AsyncSession` in `sinkserve.client` are thin shells over it that only move messages and sleep,
so both clients resume, count and give up the same way, and this logic is tested without a network.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from sinkwire.v1 import streaming_llm_pb2 as pb

Clock = Callable[[], float]  # seconds, monotonic


class SessionError(Exception):
    """The server ended the stream with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class StreamResumed(SessionError):
    """The stream broke (`cause`) and the session was resumed on a new one; the call in progress
    was cut and the session is ready for the next. Its stream now stands at `stream_position`;
    if the session was rebuilt from a checkpoint, reply tokens this client saw past it
    (`lost_tokens` of them) are not in the stream."""

    def __init__(self, cause: SessionError, opened: pb.Opened, seen: int, failed_at: float) -> None:
        super().__init__(cause.code, f"resumed after: {cause.details}")
        self.cause = cause
        self.stream_position = opened.stream_position
        self.seen_position = seen
        self.rebuilt = opened.rebuilt
        self.failed_at = failed_at  # time.monotonic() when the stream broke

    @property
    def lost_tokens(self) -> int:
        return max(0, self.seen_position - self.stream_position)


@dataclass(frozen=True)
class ResumePolicy:
    """How a session resumes itself after its stream breaks: these status codes, with
    exponential backoff, for at most `timeout_s`. None (instead of a policy) never resumes."""

    timeout_s: float = 60.0
    first_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    codes: frozenset[grpc.StatusCode] = frozenset(
        {
            grpc.StatusCode.UNAVAILABLE,  # a replica or gateway gone or draining
            grpc.StatusCode.UNKNOWN,  # the stream ended with no status
            grpc.StatusCode.INTERNAL,  # a connection reset surfaced as a protocol error
            grpc.StatusCode.CANCELLED,  # the server side went away mid-call
            grpc.StatusCode.RESOURCE_EXHAUSTED,  # no slot free to rebuild it yet (on a resume)
        }
    )

    def delays(self, clock: Clock = time.monotonic) -> Iterator[float]:
        """Backoff delays until the policy's time runs out."""
        deadline = clock() + self.timeout_s
        delay = self.first_backoff_s
        while clock() + delay < deadline:
            yield delay
            delay = min(self.max_backoff_s, delay * 2)


DEFAULT_RESUME = ResumePolicy()
CLOSE_TRIES = 2  # a close is sent once more on a resumed stream if the first one broke


@dataclass
class Reply:
    """Everything one append produced."""

    ids: list[int]
    text: str
    logprobs: list[float]
    end: pb.TurnEnd


class ReplyBuilder:
    """Accumulates one turn's server messages into a Reply."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[float] = []

    def add(self, message: pb.ServerMessage) -> Reply | None:
        """Take a message; returns the Reply once the turn has ended."""
        kind = message.WhichOneof("kind")
        if kind == "tokens":
            self.ids += message.tokens.ids
            self.text.append(message.tokens.text)
        elif kind == "scores":
            self.logprobs += message.scores.logprobs
        elif kind == "turn_end":
            return Reply(self.ids, "".join(self.text), self.logprobs, message.turn_end)
        return None


def append_message(
    text: str | None = None,
    tokens: list[int] | None = None,
    chat: tuple[str, str] | None = None,
    generate: pb.GenerationParams | None = None,
    score: bool = False,
) -> pb.ClientMessage:
    given = sum(x is not None for x in (text, tokens, chat))
    if given != 1:
        raise ValueError("append exactly one of text=, tokens= or chat=(role, content)")
    append = pb.Append(score=score)
    if text is not None:
        append.text = text
    elif tokens is not None:
        append.tokens.ids.extend(tokens)
    else:
        append.chat.role, append.chat.content = chat
    if generate is not None:
        append.generate.CopyFrom(generate)
    return pb.ClientMessage(append=append)


def chat_params(generate: dict[str, Any]) -> pb.GenerationParams:
    """The generation of `say`: 256 new tokens unless `generate` says otherwise."""
    return pb.GenerationParams(**({"max_new_tokens": 256} | generate))


OPEN = pb.ClientMessage(open=pb.Open())
CLOSE = pb.ClientMessage(close=pb.Close())
CANCEL = pb.ClientMessage(cancel=pb.Cancel())


def resume_message(session_id: str, resume_token: str) -> pb.ClientMessage:
    return pb.ClientMessage(resume=pb.Resume(session_id=session_id, resume_token=resume_token))


BEFORE_OPENED = "stream ended before the session opened"


def stream_ended(
    code: grpc.StatusCode | None, details: str | None, otherwise: str = "stream ended"
) -> SessionError:
    """Why a stream ended, from its status; an end without an error status is UNKNOWN (the
    stream ended with no status, as far as the session can tell)."""
    if code is None or code == grpc.StatusCode.OK:
        code = grpc.StatusCode.UNKNOWN
    return SessionError(code, details or otherwise)


def _position(message: pb.ServerMessage) -> int | None:
    """The stream position a server message reports, if any."""
    kind = message.WhichOneof("kind")
    if kind in ("tokens", "turn_end", "closed", "opened"):
        return getattr(message, kind).stream_position
    return None


class SessionCore:
    """One session's state across its streams, and what to do on each event; no I/O."""

    def __init__(
        self,
        first: pb.ClientMessage,
        resume_policy: ResumePolicy | None = DEFAULT_RESUME,
        clock: Clock = time.monotonic,
    ) -> None:
        if first.WhichOneof("kind") not in ("open", "resume"):
            raise ValueError("a session starts with an Open or a Resume")
        self._first = first
        self.resume_policy = resume_policy
        self.clock = clock
        self.opened: pb.Opened | None = None
        self.seen = 0  # the furthest stream position seen on the current stream
        self.resumes = 0  # how many times the session resumed itself
        self.dropped = False  # the client let the stream go: a broken stream is not resumed

    def start_message(self) -> pb.ClientMessage:
        """The first message of the next stream: the Open or Resume the session began with,
        then, once it has opened, a Resume of this session."""
        if self.opened is None:
            return self._first
        return resume_message(self.opened.session_id, self.opened.resume_token)

    def stream_started(self, message: pb.ServerMessage) -> None:
        """A new stream's first server message: it must be Opened (else SessionError, and the
        shell ends that stream); the session now stands where it says."""
        if not message.HasField("opened"):
            raise SessionError(grpc.StatusCode.UNKNOWN, "stream did not start with Opened")
        self.opened = message.opened
        self.seen = message.opened.stream_position

    def received(self, message: pb.ServerMessage) -> pb.ServerMessage:
        """A server message on the current stream: note how far the stream has come."""
        position = _position(message)
        if position is not None:
            self.seen = max(self.seen, position)
        return message

    def drop(self) -> None:
        """The client let the stream go (disconnect or close): nothing resumes from now on."""
        self.dropped = True

    def stream_broke(self, error: SessionError) -> Recovery:
        """The current stream ended with `error`: how to go on (maybe not at all)."""
        policy = self.resume_policy
        if policy is None or error.code not in policy.codes or self.dropped:
            return Recovery(self, error, iter(()))
        return Recovery(self, error, policy.delays(self.clock))


class Recovery:
    """Continuing a session after its stream broke. The shell asks `next_delay()`; while it
    gets a delay it sleeps that long, starts a stream with `core.start_message()` and reports
    `failed(error)` or `resumed()` (which it raises: the call in progress was cut). When
    `next_delay()` says None it raises `error`: the session could not be continued."""

    def __init__(self, core: SessionCore, cause: SessionError, delays: Iterator[float]) -> None:
        self.core = core
        self.cause = cause
        self.error = cause  # what ended the last try; raised if no try is left
        self._delays = delays
        self.failed_at = core.clock()
        self.seen = core.seen  # tokens seen past where the resumed stream stands are lost

    def next_delay(self) -> float | None:
        """How long to wait before the next try, or None: give up."""
        return next(self._delays, None)

    def failed(self, error: SessionError) -> None:
        """A try ended with `error`; a code the policy does not resume on (NOT_FOUND,
        PERMISSION_DENIED...) means the session is gone: no more tries."""
        self.error = error
        if error.code not in self.core.resume_policy.codes:
            self._delays = iter(())

    def resumed(self) -> StreamResumed:
        """A try opened a new stream (after `core.stream_started`)."""
        self.core.resumes += 1
        self._delays = iter(())
        return StreamResumed(self.cause, self.core.opened, self.seen, self.failed_at)
