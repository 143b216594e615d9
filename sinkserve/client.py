"""A small Python client for sinkserve sessions, asyncio and blocking.

    async with await AsyncSession.open("localhost:50051") as session:
        reply = await session.say("Hello!")             # a chat turn, the reply's text
        async for event in session.append(text="...", generate=GenerationParams(max_new_tokens=64)):
            ...                                          # Tokens / Scores / TurnEnd messages

    with Session.open("localhost:50051") as session:    # the same, blocking
        print(session.say("Hello!"))

A session outlives its stream. When a stream breaks (a replica or gateway lost, a replica
draining), the session resumes itself on a new stream, with backoff (`ResumePolicy`): the call that
was cut raises `StreamResumed`, which says where the session now stands and how many reply tokens
the client saw that are not in its stream, and the session is ready for the next call. To continue
a session later from anywhere, keep `session_id` and `resume_token` and call `resume`. The CLI
(`sinkserve chat`) and the load tester use this module.

Credentials (an API key, TLS roots, a client certificate) are a `Credentials`; without one the
client reads SINKSERVE_API_KEY, SINKSERVE_CA, SINKSERVE_CLIENT_CERT/KEY and SINKSERVE_TLS:

    session = await AsyncSession.open(target, credentials=Credentials(api_key=key, ca="ca.pem"))

An append refused on its own ends with a TurnEnd whose reason is REJECTED (`detail` says why);
the session and the stream go on.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from sinkwire.channels import Credentials, aio_channel, sync_channel
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

GenerationParams = pb.GenerationParams
__all__ = [
    "AsyncSession", "Credentials", "GenerationParams", "Reply", "ResumePolicy", "Session",
    "SessionError", "StreamResumed",
]  # fmt: skip


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

    def delays(self) -> Iterator[float]:
        """Backoff delays until the policy's time runs out."""
        deadline = time.monotonic() + self.timeout_s
        delay = self.first_backoff_s
        while time.monotonic() + delay < deadline:
            yield delay
            delay = min(self.max_backoff_s, delay * 2)


DEFAULT_RESUME = ResumePolicy()


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


def _error(error: grpc.RpcError) -> SessionError:
    return SessionError(error.code(), error.details() or "")


def _resume_message(opened: pb.Opened) -> pb.ClientMessage:
    return pb.ClientMessage(
        resume=pb.Resume(session_id=opened.session_id, resume_token=opened.resume_token)
    )


def _position(message: pb.ServerMessage) -> int | None:
    """The stream position a server message reports, if any."""
    kind = message.WhichOneof("kind")
    if kind in ("tokens", "turn_end", "closed", "opened"):
        return getattr(message, kind).stream_position
    return None


class AsyncSession:
    """One session over a bidirectional stream (asyncio), resumed on a new stream if it breaks."""

    def __init__(self, target: str, channel: grpc.aio.Channel, own_channel: bool) -> None:
        self._target = target
        self._channel = channel
        self._own_channel = own_channel
        self._call: Any = None
        self.opened: pb.Opened | None = None
        self.resume_policy: ResumePolicy | None = DEFAULT_RESUME
        self._seen = 0  # the furthest stream position seen on this stream
        self.resumes = 0  # how many times the session resumed itself
        self._dropped = False  # disconnect() was called: a broken stream is not resumed

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        target: str,
        channel: grpc.aio.Channel | None = None,
        resume_policy: ResumePolicy | None = DEFAULT_RESUME,
        credentials: Credentials | None = None,
    ) -> AsyncSession:
        """A new session; `channel` (made with `sinkwire.channels.aio_channel`) is shared and left
        open, else one is made with `credentials` (default: from the environment)."""
        first = pb.ClientMessage(open=pb.Open())
        return await cls._start(target, channel, first, resume_policy, credentials)

    @classmethod
    async def resume(
        cls,
        target: str,
        session_id: str,
        resume_token: str,
        channel: grpc.aio.Channel | None = None,
        resume_policy: ResumePolicy | None = DEFAULT_RESUME,
        credentials: Credentials | None = None,
    ) -> AsyncSession:
        message = pb.ClientMessage(
            resume=pb.Resume(session_id=session_id, resume_token=resume_token)
        )
        return await cls._start(target, channel, message, resume_policy, credentials)

    @classmethod
    async def _start(cls, target, channel, first, resume_policy, credentials=None) -> AsyncSession:
        session = cls(target, channel or aio_channel(target, credentials), channel is None)
        session.resume_policy = resume_policy
        try:
            await session._connect(first)
        except BaseException:
            await session._close_channel()
            raise
        return session

    async def _connect(self, first: pb.ClientMessage) -> None:
        """A new stream whose first message is `first`; waits for its Opened."""
        call = pb_grpc.StreamingLLMStub(self._channel).Session()
        try:
            await call.write(first)
            message = await call.read()
        except grpc.RpcError as error:
            call.cancel()
            raise _error(error) from None
        if message is grpc.aio.EOF or not message.HasField("opened"):
            code = await call.code() if message is grpc.aio.EOF else grpc.StatusCode.UNKNOWN
            details = (await call.details() if message is grpc.aio.EOF else "") or ""
            call.cancel()
            raise SessionError(code, details or "stream ended before the session opened")
        self._call = call
        self.opened = message.opened
        self._seen = message.opened.stream_position  # where the stream stands now

    # -- properties --------------------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self.opened.session_id

    @property
    def resume_token(self) -> str:
        return self.opened.resume_token

    @property
    def replica_id(self) -> str:
        return self.opened.replica_id

    # -- requests ----------------------------------------------------------------------------------
    async def append(self, **kwargs: Any) -> AsyncIterator[pb.ServerMessage]:
        """Send an append; yield server messages until its TurnEnd (included)."""
        await self.send(append_message(**kwargs))
        while True:
            message = await self.receive()
            yield message
            if message.HasField("turn_end"):
                return

    async def reply(self, **kwargs: Any) -> Reply:
        """An append, collected: ids, text, scores and the turn end."""
        builder = ReplyBuilder()
        async for message in self.append(**kwargs):
            if (reply := builder.add(message)) is not None:
                return reply
        raise SessionError(grpc.StatusCode.UNKNOWN, "stream ended inside a turn")

    async def say(self, content: str, role: str = "user", **generate: Any) -> str:
        """A chat turn and the text of the reply."""
        params = pb.GenerationParams(**({"max_new_tokens": 256} | generate))
        return (await self.reply(chat=(role, content), generate=params)).text

    async def send(self, message: pb.ClientMessage) -> None:
        try:
            await self._call.write(message)
        except (grpc.RpcError, asyncio.InvalidStateError):
            # The stream has ended (its status says why): it was not sent.
            raise await self._recover(await self._ended()) from None

    async def receive(self) -> pb.ServerMessage:
        try:
            message = await self._call.read()
        except grpc.RpcError as error:
            raise await self._recover(_error(error)) from None
        if message is grpc.aio.EOF:
            raise await self._recover(await self._ended())
        position = _position(message)
        if position is not None:
            self._seen = max(self._seen, position)
        return message

    async def cancel(self) -> None:
        await self.send(pb.ClientMessage(cancel=pb.Cancel()))

    async def close(self) -> int | None:
        """End the session on the server (frees its slot) and the stream; the session's final
        stream position."""
        try:
            for _ in range(2):  # once more on a resumed stream if the first one broke
                try:
                    await self.send(pb.ClientMessage(close=pb.Close()))
                    while not (message := await self.receive()).HasField("closed"):
                        pass
                    await self._call.done_writing()
                    return message.closed.stream_position
                except StreamResumed:
                    continue
        finally:
            await self.disconnect()

    async def disconnect(self) -> None:
        """Drop the stream but keep the session on the server (resume it later)."""
        self._dropped = True
        if self._call is not None:
            self._call.cancel()
        await self._close_channel()

    async def _close_channel(self) -> None:
        if self._own_channel and self._channel is not None:
            await self._channel.close()
            self._channel = None

    # -- resuming ----------------------------------------------------------------------------------
    async def _ended(self) -> SessionError:
        """Why the current stream ended."""
        try:
            code = await self._call.code()
            details = await self._call.details()
        except Exception:  # a call that never started
            return SessionError(grpc.StatusCode.UNKNOWN, "stream ended")
        return SessionError(code or grpc.StatusCode.UNKNOWN, details or "stream ended")

    async def _recover(self, error: SessionError) -> SessionError:
        """Resume the session on a new stream if the policy allows: StreamResumed on success,
        else the error that ended the stream (the session could not be continued)."""
        policy = self.resume_policy
        if policy is None or error.code not in policy.codes or self._dropped:
            return error
        failed_at = time.monotonic()
        seen = self._seen  # tokens past where the resumed stream stands are lost, counted once
        last = error
        for delay in policy.delays():
            await asyncio.sleep(delay)
            try:
                await self._connect(_resume_message(self.opened))
            except SessionError as again:
                last = again
                if again.code not in policy.codes:
                    return again  # NOT_FOUND, PERMISSION_DENIED...: the session is gone
                continue
            self.resumes += 1
            return StreamResumed(error, self.opened, seen, failed_at)
        return last

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Session:
    """One session over a bidirectional stream (blocking), resumed on a new stream if it breaks."""

    def __init__(
        self,
        target: str,
        first: pb.ClientMessage,
        resume_policy: ResumePolicy | None = DEFAULT_RESUME,
        credentials: Credentials | None = None,
    ) -> None:
        self._channel = sync_channel(target, credentials)
        self.resume_policy = resume_policy
        self._seen = 0
        self.resumes = 0
        self._dropped = False
        self.opened: pb.Opened | None = None
        try:
            self._connect(first)
        except BaseException:
            self._channel.close()
            raise

    def _connect(self, first: pb.ClientMessage) -> None:
        requests: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        requests.put(first)
        responses = pb_grpc.StreamingLLMStub(self._channel).Session(iter(requests.get, None))
        try:
            message = next(responses)
        except grpc.RpcError as error:
            raise _error(error) from None
        except StopIteration:
            raise SessionError(grpc.StatusCode.UNKNOWN, "stream ended") from None
        if not message.HasField("opened"):
            responses.cancel()
            raise SessionError(grpc.StatusCode.UNKNOWN, "stream did not start with Opened")
        self._requests, self._responses = requests, responses
        self.opened = message.opened
        self._seen = message.opened.stream_position  # where the stream stands now

    @classmethod
    def open(
        cls,
        target: str,
        resume_policy: ResumePolicy | None = DEFAULT_RESUME,
        credentials: Credentials | None = None,
    ) -> Session:
        return cls(target, pb.ClientMessage(open=pb.Open()), resume_policy, credentials)

    @classmethod
    def resume(
        cls,
        target: str,
        session_id: str,
        resume_token: str,
        resume_policy: ResumePolicy | None = DEFAULT_RESUME,
        credentials: Credentials | None = None,
    ) -> Session:
        message = pb.ClientMessage(
            resume=pb.Resume(session_id=session_id, resume_token=resume_token)
        )
        return cls(target, message, resume_policy, credentials)

    session_id = property(lambda self: self.opened.session_id)
    resume_token = property(lambda self: self.opened.resume_token)
    replica_id = property(lambda self: self.opened.replica_id)

    def send(self, message: pb.ClientMessage) -> None:
        self._requests.put(message)

    def receive(self) -> pb.ServerMessage:
        try:
            message = next(self._responses)
        except grpc.RpcError as error:
            raise self._recover(_error(error)) from None
        except StopIteration:
            raise self._recover(SessionError(grpc.StatusCode.UNKNOWN, "stream ended")) from None
        position = _position(message)
        if position is not None:
            self._seen = max(self._seen, position)
        return message

    def _recover(self, error: SessionError) -> SessionError:
        """As AsyncSession._recover."""
        policy = self.resume_policy
        if policy is None or error.code not in policy.codes or self._dropped:
            return error
        failed_at = time.monotonic()
        seen = self._seen
        last = error
        for delay in policy.delays():
            time.sleep(delay)
            try:
                self._connect(_resume_message(self.opened))
            except SessionError as again:
                last = again
                if again.code not in policy.codes:
                    return again
                continue
            self.resumes += 1
            return StreamResumed(error, self.opened, seen, failed_at)
        return last

    def append(self, **kwargs: Any) -> Iterator[pb.ServerMessage]:
        self.send(append_message(**kwargs))
        while True:
            message = self.receive()
            yield message
            if message.HasField("turn_end"):
                return

    def reply(self, **kwargs: Any) -> Reply:
        builder = ReplyBuilder()
        for message in self.append(**kwargs):
            if (reply := builder.add(message)) is not None:
                return reply
        raise SessionError(grpc.StatusCode.UNKNOWN, "stream ended inside a turn")

    def say(self, content: str, role: str = "user", **generate: Any) -> str:
        params = pb.GenerationParams(**({"max_new_tokens": 256} | generate))
        return self.reply(chat=(role, content), generate=params).text

    def cancel(self) -> None:
        self.send(pb.ClientMessage(cancel=pb.Cancel()))

    def close(self) -> int | None:
        try:
            for _ in range(2):
                try:
                    self.send(pb.ClientMessage(close=pb.Close()))
                    while not (message := self.receive()).HasField("closed"):
                        pass
                    return message.closed.stream_position
                except StreamResumed:
                    continue
        finally:
            self.disconnect()

    def disconnect(self) -> None:
        self._dropped = True
        self._requests.put(None)
        self._responses.cancel()
        self._channel.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
