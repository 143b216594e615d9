"""A small Python client for sinkserve sessions, asyncio and blocking.

    async with await AsyncSession.open("localhost:50051") as session:
        reply = await session.say("Hello!")             # a chat turn, the reply's text
        async for event in session.append(text="...", generate=GenerationParams(max_new_tokens=64)):
            ...                                          # Tokens / Scores / TurnEnd messages

    with Session.open("localhost:50051") as session:    # the same, blocking
        print(session.say("Hello!"))

A session outlives its stream: keep `session_id` and `resume_token` and call `resume` to continue it
on a new connection. The CLI (`sinkserve chat`) and the load tester use this module.

Credentials (an API key, TLS roots, a client certificate) are a `Credentials`; without one the
client reads SINKSERVE_API_KEY, SINKSERVE_CA, SINKSERVE_CLIENT_CERT/KEY and SINKSERVE_TLS:

    session = await AsyncSession.open(target, credentials=Credentials(api_key=key, ca="ca.pem"))

An append refused on its own ends with a TurnEnd whose reason is REJECTED (`detail` says why);
the session and the stream go on.
"""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from sinkwire.channels import Credentials, aio_channel, sync_channel
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

GenerationParams = pb.GenerationParams
__all__ = ["AsyncSession", "Credentials", "GenerationParams", "Reply", "Session", "SessionError"]


class SessionError(Exception):
    """The server ended the stream with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


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


class AsyncSession:
    """One session over one bidirectional stream (asyncio)."""

    def __init__(self, channel: grpc.aio.Channel, call: Any, opened: pb.Opened) -> None:
        self._channel = channel
        self._call = call
        self.opened = opened

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        target: str,
        channel: grpc.aio.Channel | None = None,
        credentials: Credentials | None = None,
    ) -> AsyncSession:
        """A new session; `channel` (made with `sinkwire.channels.aio_channel`) is shared and
        left open, else one is made with `credentials` (default: from the environment)."""
        return await cls._start(target, channel, pb.ClientMessage(open=pb.Open()), credentials)

    @classmethod
    async def resume(
        cls,
        target: str,
        session_id: str,
        resume_token: str,
        channel: grpc.aio.Channel | None = None,
        credentials: Credentials | None = None,
    ) -> AsyncSession:
        message = pb.ClientMessage(
            resume=pb.Resume(session_id=session_id, resume_token=resume_token)
        )
        return await cls._start(target, channel, message, credentials)

    @classmethod
    async def _start(cls, target, channel, first, credentials=None) -> AsyncSession:
        own = channel is None
        channel = channel or aio_channel(target, credentials)
        call = pb_grpc.StreamingLLMStub(channel).Session()
        try:
            await call.write(first)
            message = await call.read()
        except grpc.RpcError as error:
            if own:
                await channel.close()
            raise _error(error) from None
        if message is grpc.aio.EOF or not message.HasField("opened"):
            if own:
                await channel.close()
            raise SessionError(grpc.StatusCode.UNKNOWN, "stream ended before the session opened")
        session = cls(channel if own else None, call, message.opened)
        return session

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
        except grpc.RpcError as error:
            raise _error(error) from None

    async def receive(self) -> pb.ServerMessage:
        try:
            message = await self._call.read()
        except grpc.RpcError as error:
            raise _error(error) from None
        if message is grpc.aio.EOF:
            code = await self._call.code()
            raise SessionError(code, await self._call.details() or "stream ended")
        return message

    async def cancel(self) -> None:
        await self.send(pb.ClientMessage(cancel=pb.Cancel()))

    async def close(self) -> None:
        """End the session on the server (frees its slot) and the stream."""
        try:
            await self.send(pb.ClientMessage(close=pb.Close()))
            while not (await self.receive()).HasField("closed"):
                pass
            await self._call.done_writing()
        finally:
            await self.disconnect()

    async def disconnect(self) -> None:
        """Drop the stream but keep the session on the server (resume it later)."""
        self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Session:
    """One session over one bidirectional stream (blocking)."""

    def __init__(
        self, target: str, first: pb.ClientMessage, credentials: Credentials | None = None
    ) -> None:
        self._channel = sync_channel(target, credentials)
        self._requests: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        self._requests.put(first)
        stub = pb_grpc.StreamingLLMStub(self._channel)
        self._responses = stub.Session(iter(self._requests.get, None))
        try:
            message = self.receive()
            if not message.HasField("opened"):
                raise SessionError(grpc.StatusCode.UNKNOWN, "stream did not start with Opened")
        except SessionError:
            self.disconnect()
            raise
        self.opened = message.opened

    @classmethod
    def open(cls, target: str, credentials: Credentials | None = None) -> Session:
        return cls(target, pb.ClientMessage(open=pb.Open()), credentials)

    @classmethod
    def resume(
        cls,
        target: str,
        session_id: str,
        resume_token: str,
        credentials: Credentials | None = None,
    ) -> Session:
        message = pb.ClientMessage(
            resume=pb.Resume(session_id=session_id, resume_token=resume_token)
        )
        return cls(target, message, credentials)

    session_id = property(lambda self: self.opened.session_id)
    resume_token = property(lambda self: self.opened.resume_token)
    replica_id = property(lambda self: self.opened.replica_id)

    def send(self, message: pb.ClientMessage) -> None:
        self._requests.put(message)

    def receive(self) -> pb.ServerMessage:
        try:
            return next(self._responses)
        except grpc.RpcError as error:
            raise _error(error) from None
        except StopIteration:
            raise SessionError(grpc.StatusCode.UNKNOWN, "stream ended") from None

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

    def close(self) -> None:
        try:
            self.send(pb.ClientMessage(close=pb.Close()))
            while not self.receive().HasField("closed"):
                pass
        finally:
            self.disconnect()

    def disconnect(self) -> None:
        self._requests.put(None)
        self._responses.cancel()
        self._channel.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
