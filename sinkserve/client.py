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

Both clients are thin I/O shells over one `SessionCore` (sinkserve.session_core), which holds the
session's state and decides when and how to resume.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from sinkserve.session_core import (
    BEFORE_OPENED,
    CANCEL,
    CLOSE,
    CLOSE_TRIES,
    DEFAULT_RESUME,
    OPEN,
    Reply,
    ReplyBuilder,
    ResumePolicy,
    SessionCore,
    SessionError,
    StreamResumed,
    append_message,
    chat_params,
    resume_message,
    stream_ended,
)
from sinkwire.channels import Credentials, aio_channel, sync_channel
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

GenerationParams = pb.GenerationParams
__all__ = [
    "AsyncSession", "Credentials", "GenerationParams", "Reply", "ResumePolicy", "Session",
    "SessionError", "StreamResumed",
]  # fmt: skip


def _error(error: grpc.RpcError) -> SessionError:
    return SessionError(error.code(), error.details() or "")


class _SessionProperties:
    """What both clients show of their core."""

    _core: SessionCore

    @property
    def opened(self) -> pb.Opened:
        """The Opened of the current stream."""
        return self._core.opened

    @property
    def session_id(self) -> str:
        return self._core.opened.session_id

    @property
    def resume_token(self) -> str:
        return self._core.opened.resume_token

    @property
    def replica_id(self) -> str:
        return self._core.opened.replica_id

    @property
    def stream_position(self) -> int:
        """The furthest stream position this client has seen (Opened, tokens, turn ends)."""
        return self._core.seen

    @property
    def resumes(self) -> int:
        """How many times the session resumed itself."""
        return self._core.resumes

    @property
    def resume_policy(self) -> ResumePolicy | None:
        return self._core.resume_policy

    @resume_policy.setter
    def resume_policy(self, policy: ResumePolicy | None) -> None:
        self._core.resume_policy = policy


class AsyncSession(_SessionProperties):
    """One session over a bidirectional stream (asyncio), resumed on a new stream if it breaks."""

    def __init__(
        self,
        target: str,
        channel: grpc.aio.Channel,
        own_channel: bool,
        core: SessionCore | None = None,
    ) -> None:
        self._target = target
        self._channel = channel
        self._own_channel = own_channel
        self._call: Any = None
        self._core = core or SessionCore(OPEN)

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
        return await cls._start(target, channel, SessionCore(OPEN, resume_policy), credentials)

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
        core = SessionCore(resume_message(session_id, resume_token), resume_policy)
        return await cls._start(target, channel, core, credentials)

    @classmethod
    async def _start(cls, target, channel, core, credentials=None) -> AsyncSession:
        session = cls(target, channel or aio_channel(target, credentials), channel is None, core)
        try:
            await session._connect()
        except BaseException:
            await session._close_channel()
            raise
        return session

    async def _connect(self) -> None:
        """A new stream started with the core's start message; waits for its Opened."""
        call = pb_grpc.StreamingLLMStub(self._channel).Session()
        try:
            await call.write(self._core.start_message())
            message = await call.read()
        except grpc.RpcError as error:
            call.cancel()
            raise _error(error) from None
        try:
            if message is grpc.aio.EOF:
                raise stream_ended(await call.code(), await call.details(), BEFORE_OPENED)
            self._core.stream_started(message)
        except BaseException:
            call.cancel()
            raise
        self._call = call

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
        return (await self.reply(chat=(role, content), generate=chat_params(generate))).text

    async def send(self, message: pb.ClientMessage) -> None:
        """Send `message`; on a stream that has ended it is not sent, and the session resumes
        (StreamResumed) or the stream's error is raised."""
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
        return self._core.received(message)

    async def cancel(self) -> None:
        await self.send(CANCEL)

    async def close(self) -> int | None:
        """End the session on the server (frees its slot) and the stream; the session's final
        stream position."""
        try:
            for _ in range(CLOSE_TRIES):
                try:
                    await self.send(CLOSE)
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
        self._core.drop()
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
            return stream_ended(await self._call.code(), await self._call.details())
        except Exception:  # a call that never started
            return stream_ended(None, None)

    async def _recover(self, error: SessionError) -> SessionError:
        """Resume the session on a new stream if the policy allows: StreamResumed on success,
        else the error that ended the stream (the session could not be continued)."""
        self._call.cancel()  # the broken stream is done; let go of it
        recovery = self._core.stream_broke(error)
        while (delay := recovery.next_delay()) is not None:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except SessionError as again:
                recovery.failed(again)
            else:
                return recovery.resumed()
        return recovery.error

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Requests:
    """A blocking stream's request iterator: what `put` gives, until `end`. grpc consumes it on
    a thread of its own that waits here; `end` is what lets that thread go."""

    _END = object()

    def __init__(self, first: pb.ClientMessage) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queue.put(first)

    def put(self, message: pb.ClientMessage) -> None:
        self._queue.put(message)

    def end(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[pb.ClientMessage]:
        return iter(self._queue.get, self._END)


class Session(_SessionProperties):
    """One session over a bidirectional stream (blocking), resumed on a new stream if it breaks."""

    def __init__(
        self,
        target: str,
        first: pb.ClientMessage,
        resume_policy: ResumePolicy | None = DEFAULT_RESUME,
        credentials: Credentials | None = None,
    ) -> None:
        self._core = SessionCore(first, resume_policy)
        self._channel = sync_channel(target, credentials)
        self._requests: _Requests | None = None
        self._responses: Any = None
        try:
            self._connect()
        except BaseException:
            self._channel.close()
            raise

    @classmethod
    def open(
        cls,
        target: str,
        resume_policy: ResumePolicy | None = DEFAULT_RESUME,
        credentials: Credentials | None = None,
    ) -> Session:
        return cls(target, OPEN, resume_policy, credentials)

    @classmethod
    def resume(
        cls,
        target: str,
        session_id: str,
        resume_token: str,
        resume_policy: ResumePolicy | None = DEFAULT_RESUME,
        credentials: Credentials | None = None,
    ) -> Session:
        return cls(target, resume_message(session_id, resume_token), resume_policy, credentials)

    def _connect(self) -> None:
        """A new stream started with the core's start message; waits for its Opened."""
        requests = _Requests(self._core.start_message())
        responses = pb_grpc.StreamingLLMStub(self._channel).Session(iter(requests))
        try:
            try:
                message = next(responses)
            except grpc.RpcError as error:
                raise _error(error) from None
            except StopIteration:
                raise stream_ended(responses.code(), responses.details(), BEFORE_OPENED) from None
            self._core.stream_started(message)
        except BaseException:
            self._let_go(requests, responses)
            raise
        self._requests, self._responses = requests, responses

    @staticmethod
    def _let_go(requests: _Requests | None, responses: Any) -> None:
        """End a stream on this side: its request thread returns, the call is cancelled."""
        if requests is not None:
            requests.end()
        if responses is not None:
            responses.cancel()

    # -- requests ----------------------------------------------------------------------------------
    def append(self, **kwargs: Any) -> Iterator[pb.ServerMessage]:
        """Send an append; yield server messages until its TurnEnd (included)."""
        self.send(append_message(**kwargs))
        while True:
            message = self.receive()
            yield message
            if message.HasField("turn_end"):
                return

    def reply(self, **kwargs: Any) -> Reply:
        """An append, collected: ids, text, scores and the turn end."""
        builder = ReplyBuilder()
        for message in self.append(**kwargs):
            if (reply := builder.add(message)) is not None:
                return reply
        raise SessionError(grpc.StatusCode.UNKNOWN, "stream ended inside a turn")

    def say(self, content: str, role: str = "user", **generate: Any) -> str:
        """A chat turn and the text of the reply."""
        return self.reply(chat=(role, content), generate=chat_params(generate)).text

    def send(self, message: pb.ClientMessage) -> None:
        """Send `message`; on a stream that has ended it is not sent, and the session resumes
        (StreamResumed) or the stream's error is raised."""
        if self._responses.done():  # the stream has ended (its status says why)
            raise self._recover(self._ended())
        self._requests.put(message)

    def receive(self) -> pb.ServerMessage:
        try:
            message = next(self._responses)
        except grpc.RpcError as error:
            raise self._recover(_error(error)) from None
        except StopIteration:
            raise self._recover(self._ended()) from None
        return self._core.received(message)

    def cancel(self) -> None:
        self.send(CANCEL)

    def close(self) -> int | None:
        """End the session on the server (frees its slot) and the stream; the session's final
        stream position."""
        try:
            for _ in range(CLOSE_TRIES):
                try:
                    self.send(CLOSE)
                    while not (message := self.receive()).HasField("closed"):
                        pass
                    return message.closed.stream_position
                except StreamResumed:
                    continue
        finally:
            self.disconnect()

    def disconnect(self) -> None:
        """Drop the stream but keep the session on the server (resume it later)."""
        self._core.drop()
        self._let_go(self._requests, self._responses)
        self._channel.close()

    # -- resuming ----------------------------------------------------------------------------------
    def _ended(self) -> SessionError:
        """Why the current stream ended."""
        return stream_ended(self._responses.code(), self._responses.details())

    def _recover(self, error: SessionError) -> SessionError:
        """As AsyncSession._recover."""
        self._let_go(self._requests, self._responses)  # else its request thread waits forever
        recovery = self._core.stream_broke(error)
        while (delay := recovery.next_delay()) is not None:
            time.sleep(delay)
            try:
                self._connect()
            except SessionError as again:
                recovery.failed(again)
            else:
                return recovery.resumed()
        return recovery.error

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
