"""Fuzzing a real service: random sequences of client messages from hostile and careless clients.

A hypothesis state machine drives several concurrent streams at a real service (tests/local_service:
engine process, replica, gateway over loopback, tiny model on CPU, API keys on): opens and resumes
with good, wrong, missing and other keys' credentials; appends that are valid, out of range or
malformed; cancels, closes, half-closes and streams dropped mid-reply; messages out of order,
empty, unreadable or over the size limit; takeovers. After every case:

- every stream ended with a documented status (never INTERNAL or UNKNOWN), one that what it was
  sent allows, with a short one-line message; the one exception is grpc.aio's own INTERNAL
  "Internal error from Core" from a write that raced the stream's end, the client's or the
  gateway's relay to the replica (the contract states it; such streams are counted apart);
- a stream that ended normally got exactly one TurnEnd per Append, REJECTED exactly for the
  appends that are invalid on their own;
- every session it knew of is closed, and the engine holds no more sessions than before
  (sessions whose ids a dropped stream never learned expire after `session_ttl_s`);

every 25 cases, and at the end, a canary session, open on its own stream through the whole run,
answers with exactly the greedy tokens recorded before the run; at the end every slot but the
canary's is free and nothing is held or queued.

CI runs 1,000 cases of up to 8 steps (SINKSERVE_FUZZ_PROFILE=ci, the default);
SINKSERVE_FUZZ_PROFILE=nightly runs 20,000 of up to 20 (SINKSERVE_FUZZ_CASES overrides the count). The figures of the last run are printed (and kept in docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from deployments.auth import hash_line, new_key
from deployments.gateway_service import SESSION_METHOD
from sinkwire.channels import Credentials, aio_channel
from sinkwire.v1 import streaming_llm_pb2 as pb
from tests.local_service import LocalService

pytestmark = pytest.mark.slow

PROFILES = {  # cases: how many random client sequences to run; steps: at most this many each
    "ci": {"cases": 1000, "steps": 8},
    "nightly": {"cases": 20_000, "steps": 20},
}
PROFILE = dict(PROFILES[os.environ.get("SINKSERVE_FUZZ_PROFILE", "ci")])
if os.environ.get("SINKSERVE_FUZZ_CASES"):  # e.g. a quick run while working on the service
    PROFILE["cases"] = int(os.environ["SINKSERVE_FUZZ_CASES"])
BATCH = 200  # hypothesis examples per run; runs repeat until the profile's cases are done
MAX_MESSAGE_BYTES = 16 * 1024
SESSION_TTL_S = 2.0
VOCAB = 49152  # the tiny model's
CANARY_EVERY = 25
CANARY_TURNS = 30  # then the canary session is closed and a fresh one starts over
CANARY_PROMPT = [11, 22, 33, 44]
CANARY_PARAMS = pb.GenerationParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
S = grpc.StatusCode
# Everything a stream may end with (the proto's list), and what no stream may ever end with.
DOCUMENTED = {
    S.OK, S.UNAUTHENTICATED, S.PERMISSION_DENIED, S.NOT_FOUND, S.INVALID_ARGUMENT,
    S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED, S.ABORTED, S.UNAVAILABLE, S.CANCELLED,
}  # fmt: skip


# -- the client side: one event loop on a thread -------------------------------------------------------
# A stock grpc.aio client. A write that loses the race with the end of a stream fails with
# INTERNAL "Internal error from Core", and grpc.aio then reports that as the stream's status in
# place of the one sent (grpc/grpc#36066; hostile clients write whenever they like). It happens
# here at two places: the client's own write, and the gateway's relay of a client message to a
# replica that has just ended the stream (the gateway is a grpc.aio client of the replica, and
# passes the replaced status on). The contract says so (protos/sinkserve/v1/streaming_llm.proto):
# such streams are counted apart (client-side and gateway-side), not checked further.
CLIENT_WRITE_RACE = (S.INTERNAL, "Internal error from Core")
# The gateway's relay racing the replica's end: the gateway's grpc.aio replaces the replica's
# status with INTERNAL, which the gateway reports as an unreachable replica (UNAVAILABLE; the
# session is kept). The replica here never becomes unreachable otherwise.
GATEWAY_RELAY_RACE = (S.UNAVAILABLE, "the session's replica r0 is unreachable; resume it later")
RACES = {CLIENT_WRITE_RACE: "client write", GATEWAY_RELAY_RACE: "gateway relay"}


class ClientLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Stream:
    """One fuzzed stream: what was sent, what came back, how it may end."""

    key: str | None
    call: Any = None
    channel: Any = None
    messages: list[pb.ServerMessage] = field(default_factory=list)
    opened: asyncio.Future | None = None
    ended: asyncio.Future | None = None
    allowed: set = field(default_factory=lambda: {S.OK})
    appends: list[str] = field(default_factory=list)  # per Append: ok / rejected / maybe
    sending: bool = True  # may still be written to
    wants_session: bool = True  # its first message opens or resumes one (if the key lets it)
    session_id: str = ""  # the session it holds, once known
    write_raced: bool = False  # a write failed as the server ended the stream (CLIENT_WRITE_RACE)

    def end(self, *codes: grpc.StatusCode) -> None:
        """Something was sent that may end the stream with one of `codes`."""
        self.allowed.update(codes)


@dataclass
class Figures:
    cases: int = 0
    streams: int = 0
    messages: int = 0
    statuses: Counter = field(default_factory=Counter)
    rejected_turns: int = 0
    canary_checks: int = 0
    crashes: int = 0
    leaks: int = 0
    write_races: Counter = field(default_factory=Counter)  # statuses grpc.aio replaced, by where


class Harness:
    """The service, the client loop, the keys and the canary, shared by every case."""

    def __init__(self, tmp_path) -> None:
        self.keys: dict[str, Credentials] = {}
        self.owners: dict[str, str] = {}
        lines = []
        for label, spec in (("a", {}), ("b", {}), ("c", {"max_sessions": 3})):
            key, _ = new_key()
            lines.append(hash_line(key, name=f"owner-{label}", **spec))
            self.keys[label] = Credentials(api_key=key)
        self.keys["wrong"] = Credentials(api_key=new_key()[0])
        self.keys["none"] = Credentials()
        (tmp_path / "keys").write_text("\n".join(lines) + "\n")
        self.service = LocalService(
            slots=24,
            api_keys=str(tmp_path / "keys"),
            max_message_bytes=MAX_MESSAGE_BYTES,
            max_buffered_tokens=64,
            session_ttl_s=SESSION_TTL_S,
        ).__enter__()
        self.client = ClientLoop()
        self.figures = Figures()
        self.expected_canary = self.client.run(self._record_canary())
        self.canary_replies = 0
        self.client.run(self._open_canary())
        self.slots_total = self.service.stats().slots_total

    def close(self) -> None:
        self.client.run(self._close_canary())
        self.client.close()
        self.service.__exit__(None, None, None)

    async def _close_canary(self) -> None:
        await self.canary.write(pb.ClientMessage(close=pb.Close()).SerializeToString())
        await self.canary.read()
        await self.canary_channel.close()

    # -- the canary ---------------------------------------------------------------------------------
    async def _record_canary(self, turns: int = CANARY_TURNS) -> list[list[int]]:
        """The canary's greedy replies, turn after turn, on a quiet service: its reference."""
        channel = aio_channel(self.service.address, self.keys["a"])
        replies = []
        call = channel.stream_stream(SESSION_METHOD)()
        await call.write(pb.ClientMessage(open=pb.Open()).SerializeToString())
        await call.read()
        for _ in range(turns):
            replies.append(await self._canary_turn(call))
        await call.write(pb.ClientMessage(close=pb.Close()).SerializeToString())
        await call.read()
        await channel.close()
        return replies

    @staticmethod
    async def _canary_turn(call) -> list[int]:
        append = pb.Append(tokens=pb.TokenIds(ids=CANARY_PROMPT), generate=CANARY_PARAMS)
        await call.write(pb.ClientMessage(append=append).SerializeToString())
        ids = []
        while True:
            message = pb.ServerMessage.FromString(await asyncio.wait_for(call.read(), 30))
            ids += message.tokens.ids
            if message.HasField("turn_end"):
                assert message.turn_end.reason == pb.TurnEnd.LENGTH, message
                return ids

    async def _open_canary(self) -> None:
        self.canary_channel = aio_channel(self.service.address, self.keys["a"])
        self.canary = self.canary_channel.stream_stream(SESSION_METHOD)()
        await self.canary.write(pb.ClientMessage(open=pb.Open()).SerializeToString())
        await self.canary.read()

    async def _reopen_canary(self) -> None:
        await self._close_canary()
        await self._open_canary()

    def check_canary(self) -> None:
        if self.canary_replies == len(self.expected_canary):  # a fresh canary, the same replies
            self.client.run(self._reopen_canary())
            self.canary_replies = 0
        started = time.monotonic()
        ids = self.client.run(self._canary_turn(self.canary))
        expected = self.expected_canary[self.canary_replies]
        self.canary_replies += 1
        self.figures.canary_checks += 1
        assert ids == expected, f"the canary's greedy reply changed: {ids} != {expected}"
        assert time.monotonic() - started < 20, "the canary took too long to answer"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    made = Harness(tmp_path_factory.mktemp("fuzz"))
    yield made
    made.close()


# -- what clients send ------------------------------------------------------------------------------
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "\x00\x01", "🦀" * 5]),
)
valid_params = st.builds(
    pb.GenerationParams,
    max_new_tokens=st.integers(1, 6),
    temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    top_k=st.integers(0, 50),
    top_p=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    stop=st.lists(st.text(min_size=1, max_size=5), max_size=3),
    ignore_eos=st.booleans(),
)
bad_params = st.one_of(
    st.builds(pb.GenerationParams, max_new_tokens=st.integers(1_000_000_001, 2**32 - 1)),
    st.builds(
        pb.GenerationParams,
        max_new_tokens=st.just(2),
        temperature=st.sampled_from([-1.0, 101.0, float("nan"), float("inf"), -float("inf")]),
    ),
    st.builds(
        pb.GenerationParams,
        max_new_tokens=st.just(2),
        top_p=st.sampled_from([-0.5, 1.5, float("nan")]),
    ),
    st.builds(
        pb.GenerationParams, max_new_tokens=st.just(2), top_k=st.integers(VOCAB + 1, 2**32 - 1)
    ),
    st.builds(
        pb.GenerationParams,
        max_new_tokens=st.just(2),
        stop=st.lists(st.just("x"), min_size=17, max_size=20),
    ),
    st.builds(
        pb.GenerationParams, max_new_tokens=st.just(2), stop=st.sampled_from([[""], ["y" * 257]])
    ),
)
ids = st.integers(0, VOCAB - 1)
bad_ids = st.one_of(st.integers(VOCAB, 2**31 - 1), st.integers(-(2**31), -1))


@st.composite
def appends(draw) -> tuple[pb.Append, str]:
    """An Append and whether it is valid ("ok"), invalid on its own ("rejected"), or either."""
    valid = ["tokens", "tokens", "text", "text", "chat", "chat"]
    kinds = [*valid, "bad_ids", "bad_params", "no_input", "bad_role", "huge_role", "empty_generate"]
    kind = draw(st.sampled_from(kinds))
    generate = draw(st.one_of(st.none(), valid_params))
    append = pb.Append(score=draw(st.booleans()))
    verdict = "ok"
    if kind == "tokens":
        append.tokens.ids.extend(draw(st.lists(ids, max_size=12)))
    elif kind == "text":
        append.text = draw(texts)
    elif kind == "chat":
        append.chat.role = draw(st.sampled_from(["system", "user", "assistant"]))
        append.chat.content = draw(texts)
    elif kind == "bad_ids":
        append.tokens.ids.extend([*draw(st.lists(ids, max_size=3)), draw(bad_ids)])
        verdict = "rejected"
    elif kind == "bad_params":
        append.tokens.ids.extend([1, 2])
        generate = draw(bad_params)
        verdict = "rejected"
    elif kind == "no_input":
        verdict = "rejected"
    elif kind in ("bad_role", "huge_role"):
        append.chat.role = draw(st.text(max_size=10)) if kind == "bad_role" else "r" * 5000
        append.chat.content = "x"
        if append.chat.role in ("system", "user", "assistant"):
            append.chat.role += "!"
        verdict = "rejected"
    else:  # an empty input asking for a reply: fine if the stream has a token to continue from
        append.tokens.ids.extend([])
        generate = pb.GenerationParams(max_new_tokens=2)
        append.text = "" if draw(st.booleans()) else append.text
        verdict = "maybe"
    if generate is not None:
        append.generate.CopyFrom(generate)
    empty = (kind == "tokens" and not append.tokens.ids) or (kind == "text" and not append.text)
    if empty and generate is not None:
        verdict = "maybe"  # fine if the stream has a token to continue from
    return append, verdict


GARBAGE = [b"\xff\xff\xff\x01", b"\x0a", b"\x1a\x05\x0a\x03abc\xff", b"\x80" * 12]
OPEN = pb.ClientMessage(open=pb.Open()).SerializeToString()
BAD_FIRST = [
    *GARBAGE,
    b"",  # an empty ClientMessage
    pb.ClientMessage(append=pb.Append(text="hi")).SerializeToString(),
    pb.ClientMessage(close=pb.Close()).SerializeToString(),
    pb.ClientMessage(resume=pb.Resume(session_id="r0." + "x" * 10_000)).SerializeToString(),
    pb.ClientMessage(resume=pb.Resume(session_id="nope")).SerializeToString(),
    pb.ClientMessage(resume=pb.Resume(session_id="r9." + "a" * 32)).SerializeToString(),
    pb.ClientMessage(resume=pb.Resume(session_id="r0." + "b" * 32, resume_token="t")).SerializeToString(),
    b"x" * (MAX_MESSAGE_BYTES + 10),
]  # fmt: skip
VIOLATIONS = {  # mid-stream, and the status each may end the stream with
    "open": (OPEN, S.FAILED_PRECONDITION),
    "resume": (
        pb.ClientMessage(resume=pb.Resume(session_id="r0." + "c" * 32)).SerializeToString(),
        S.FAILED_PRECONDITION,
    ),
    "empty": (b"", S.INVALID_ARGUMENT),
    "garbage": (GARBAGE[0], S.INVALID_ARGUMENT),
    "oversized": (b"\x1a" + b"\xff" * (MAX_MESSAGE_BYTES + 10), S.RESOURCE_EXHAUSTED),
    "oversized_text": (
        pb.ClientMessage(append=pb.Append(text="z" * (MAX_MESSAGE_BYTES + 1))).SerializeToString(),
        S.RESOURCE_EXHAUSTED,
    ),
}


# -- the state machine ---------------------------------------------------------------------------------
class ClientsMachine(RuleBasedStateMachine):
    harness: Harness  # set by the test

    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.all: list[Stream] = []
        self.unknown_sessions = 0  # opens whose id the client may never have learned

    @initialize()
    def case(self) -> None:
        self.h = type(self).harness
        self.run = self.h.client.run
        self.baseline = self.h.service.stats().sessions

    # -- starting streams ---------------------------------------------------------------------------
    async def _start(self, stream: Stream, first: bytes) -> None:
        stream.channel = aio_channel(self.h.service.address, self.h.keys[stream.key or "none"])
        stream.call = stream.channel.stream_stream(SESSION_METHOD)()
        stream.opened = asyncio.get_running_loop().create_future()
        stream.ended = asyncio.get_running_loop().create_future()
        await self._write(stream, first)
        asyncio.get_running_loop().create_task(self._read(stream))

    async def _read(self, stream: Stream) -> None:
        try:
            while True:
                raw = await stream.call.read()
                if raw is grpc.aio.EOF:
                    break
                message = pb.ServerMessage.FromString(raw)
                stream.messages.append(message)
                if message.HasField("opened") and not stream.opened.done():
                    stream.opened.set_result(message.opened)
        except grpc.aio.AioRpcError:
            pass
        except asyncio.CancelledError:
            pass
        if not stream.opened.done():
            stream.opened.set_result(None)
        code = await stream.call.code()
        stream.ended.set_result((code, await stream.call.details() or ""))

    async def _write(self, stream: Stream, raw: bytes) -> None:
        self.h.figures.messages += 1
        try:
            await stream.call.write(raw)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            stream.sending = False  # it ended already
            if isinstance(error, grpc.aio.AioRpcError):
                stream.write_raced = (error.code(), error.details()) == CLIENT_WRITE_RACE

    def _new(self, key: str | None, first: bytes) -> Stream:
        stream = Stream(key)
        self.all.append(stream)
        self.h.figures.streams += 1
        if key in ("wrong", "none"):
            stream.end(S.UNAUTHENTICATED)
            stream.allowed.discard(S.OK)
        self.run(self._start(stream, first))
        return stream

    @rule(
        target=streams,
        key=st.sampled_from(["a", "a", "a", "b", "b", "c", "wrong", "none"]),
        first=st.one_of(st.just(OPEN), st.just(OPEN), st.just(OPEN), st.sampled_from(BAD_FIRST)),
    )
    def open(self, key: str, first: bytes) -> Stream:
        if first != OPEN:
            return self.bad_first(first)
        stream = self._new(key, first)
        stream.end(S.RESOURCE_EXHAUSTED)  # no free slot, or key c at its max_sessions
        return stream

    @rule(
        target=streams,
        source=streams,
        key=st.sampled_from(["same", "same", "other", "wrong"]),
        token=st.sampled_from(["right", "right", "wrong", "empty"]),
    )
    def resume(self, source: Stream, key: str, token: str) -> Stream:
        opened = self.run(asyncio.wait_for(asyncio.shield(source.opened), 5))
        if opened is not None and not source.session_id:
            source.session_id = opened.session_id
        if opened is None:
            return self.bad_first(b"")  # nothing to resume: send an empty message instead
        owner = source.key if key == "same" else ("b" if source.key != "b" else "a")
        if key == "wrong":
            owner = "wrong"
        resume = pb.Resume(session_id=opened.session_id)
        resume.resume_token = {"right": opened.resume_token, "wrong": "AAAA", "empty": ""}[token]
        stream = self._new(owner, pb.ClientMessage(resume=resume).SerializeToString())
        if owner != "wrong":
            if token != "right" or owner != source.key:
                stream.end(S.PERMISSION_DENIED)
                stream.allowed.discard(S.OK)
            else:  # a takeover: the session's streams so far, if still attached, end ABORTED
                for other in self.all:
                    if other.session_id == opened.session_id:
                        other.end(S.ABORTED)
                stream.session_id = opened.session_id
            stream.end(S.NOT_FOUND)  # closed or expired meanwhile
        return stream

    def bad_first(self, first: bytes) -> Stream:
        stream = self._new("a", first)
        stream.allowed = {
            S.INVALID_ARGUMENT, S.FAILED_PRECONDITION, S.NOT_FOUND, S.PERMISSION_DENIED,
            S.RESOURCE_EXHAUSTED,
        }  # fmt: skip
        stream.wants_session = False
        return stream

    # -- on a stream ----------------------------------------------------------------------------------
    @rule(stream=streams, batch=st.lists(appends(), min_size=1, max_size=3))
    def append(self, stream: Stream, batch: list[tuple[pb.Append, str]]) -> None:
        for message, verdict in batch:
            if stream.sending:
                stream.appends.append(verdict)
                self.run(self._write(stream, pb.ClientMessage(append=message).SerializeToString()))

    @rule(stream=streams)
    def cancel(self, stream: Stream) -> None:
        if stream.sending:
            self.run(self._write(stream, pb.ClientMessage(cancel=pb.Cancel()).SerializeToString()))

    @rule(
        stream=streams,
        how=st.sampled_from(["close", "close", "half_close", "drop", "drop", *VIOLATIONS]),
    )
    def finish(self, stream: Stream, how: str) -> None:
        """Close, half-close, drop, or break the protocol (which ends the stream; the turns
        before it still answer)."""
        if not stream.sending:
            return
        stream.sending = False
        if how == "close":
            self.run(self._write(stream, pb.ClientMessage(close=pb.Close()).SerializeToString()))
            self.run(self._done_writing(stream))
        elif how == "half_close":
            self.run(self._done_writing(stream))
        elif how == "drop":
            stream.end(S.CANCELLED)
            self.unknown_sessions += 1  # it may drop before it learned its session's id
            self.run(self._cancel(stream))
        else:
            raw, code = VIOLATIONS[how]
            stream.end(code)
            stream.allowed.discard(S.OK)
            self.run(self._write(stream, raw))

    async def _done_writing(self, stream: Stream) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await stream.call.done_writing()

    async def _cancel(self, stream: Stream) -> None:
        stream.call.cancel()

    @invariant()
    def nothing_ended_badly_yet(self) -> None:
        for stream in getattr(self, "all", []):
            if stream.ended is not None and stream.ended.done():
                code, details = stream.ended.result()
                if (code, details) in RACES:
                    continue
                assert code not in (S.INTERNAL, S.UNKNOWN), (code, details)

    # -- after the case -------------------------------------------------------------------------------
    def teardown(self) -> None:
        if not hasattr(self, "h"):
            return
        h = self.h
        self.run(self._finish_all(), timeout=120)
        for stream in self.all:
            self._check_stream(stream)
        self.run(self._close_known_sessions(), timeout=120)
        self._check_sessions()
        h.figures.cases += 1
        if h.figures.cases % CANARY_EVERY == 0:
            h.check_canary()

    async def _finish_all(self) -> None:
        for stream in self.all:
            if stream.sending:
                stream.sending = False
                await self._write(stream, pb.ClientMessage(close=pb.Close()).SerializeToString())
                await self._done_writing(stream)
        for stream in self.all:
            try:
                await asyncio.wait_for(asyncio.shield(stream.ended), 60)
            except TimeoutError:
                raise AssertionError(f"a stream never ended: sent {stream.appends}") from None
            await stream.channel.close()

    def _check_stream(self, stream: Stream) -> None:
        code, details = stream.ended.result()
        figures = self.h.figures
        if (code, details) in RACES:  # the status sent is not known: no more checks
            figures.write_races[RACES[code, details]] += 1
            return
        figures.statuses[code.name] += 1
        if code in (S.INTERNAL, S.UNKNOWN) or code not in DOCUMENTED:
            figures.crashes += 1
        assert code in DOCUMENTED, (code, details)
        assert code in stream.allowed, f"ended {code.name} ({details!r}), allowed {stream.allowed}"
        assert "\n" not in details and len(details) <= 300, details
        assert "127.0.0.1" not in details and "ipv4" not in details, details
        ends = [m.turn_end for m in stream.messages if m.HasField("turn_end")]
        figures.rejected_turns += sum(e.reason == pb.TurnEnd.REJECTED for e in ends)
        assert len(ends) <= len(stream.appends)
        if code == S.OK and stream.wants_session:
            assert len(ends) == len(stream.appends), (ends, stream.appends)
            for verdict, end in zip(stream.appends, ends, strict=True):
                rejected = end.reason == pb.TurnEnd.REJECTED
                assert verdict == "maybe" or rejected == (verdict == "rejected"), (verdict, end)
                assert not rejected or (end.detail and len(end.detail) <= 300)

    async def _close_known_sessions(self) -> None:
        """Every session a stream of this case learned of: resume it and close it."""
        sessions = {}
        for stream in self.all:
            opened = stream.opened.result() if stream.opened.done() else None
            closed = any(m.HasField("closed") for m in stream.messages)
            if opened is not None and stream.key not in ("wrong", "none") and not closed:
                sessions[opened.session_id] = (opened, stream.key)
        await asyncio.gather(*(self._close(*known) for known in sessions.values()))

    async def _close(self, opened: pb.Opened, key: str) -> None:
        channel = aio_channel(self.h.service.address, self.h.keys[key])
        call = channel.stream_stream(SESSION_METHOD)()
        resume = pb.Resume(session_id=opened.session_id, resume_token=opened.resume_token)
        try:
            await call.write(pb.ClientMessage(resume=resume).SerializeToString())
            await call.write(pb.ClientMessage(close=pb.Close()).SerializeToString())
            await call.done_writing()
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            # closed already by another of its streams, or expired (short TTL here); or the Close
            # written as the refusal ended the stream (CLIENT_WRITE_RACE)
            ended = (error.code(), error.details())
            assert error.code() in (S.NOT_FOUND, S.ABORTED) or ended == CLIENT_WRITE_RACE, error
        finally:
            await channel.close()

    def _check_sessions(self) -> None:
        """No session left behind: at most the ones whose ids a dropped stream never learned."""
        deadline = time.monotonic() + 30  # a cap: sessions usually go within milliseconds
        while True:
            stats = self.h.service.stats()
            extra = stats.sessions - self.baseline
            if extra <= 0 or (extra <= self.unknown_sessions and stats.decode_held == 0):
                return
            if time.monotonic() > deadline:
                self.h.figures.leaks += 1
                raise AssertionError(f"{extra} sessions left behind ({stats})")
            time.sleep(0.05)


def new_clients_machine() -> ClientsMachine:
    """The state machine's factory, a function rather than the class: Hypothesis digests its
    factory's source, and inspect finds a class's source by `ast.parse` of the whole module,
    which on CPython 3.11.7 can fail with "SystemError: AST constructor recursion depth
    mismatch" while another thread (the service's, formatting a logged traceback) parses too
    (3.11.7 shares the AST converter's recursion counter between threads). Seen in a full run."""
    return ClientsMachine()


def test_random_client_message_sequences(harness) -> None:
    ClientsMachine.harness = harness
    started = time.monotonic()
    while harness.figures.cases < PROFILE["cases"]:
        run_state_machine_as_test(
            new_clients_machine,
            settings=settings(
                max_examples=min(BATCH, PROFILE["cases"] - harness.figures.cases),
                stateful_step_count=PROFILE["steps"],
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    harness.check_canary()
    # At the end: the sessions of dropped streams have expired; only the canary is left.
    deadline = time.monotonic() + SESSION_TTL_S + 60  # a cap: the sweep takes about the TTL
    while (stats := harness.service.stats()).sessions > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    figures = harness.figures
    print(
        f"\nfuzz: {figures.cases} cases, {figures.streams} streams, {figures.messages} messages, "
        f"{figures.rejected_turns} rejected turns, {figures.canary_checks} canary checks, "
        f"crashes {figures.crashes}, leaks {figures.leaks}, write races "
        f"{dict(figures.write_races)}, {time.monotonic() - started:.0f} s; "
        f"statuses {dict(figures.statuses)}"
    )
    left = sorted(harness.service.sessions.entries)
    assert stats.sessions == 1 and stats.slots_free == harness.slots_total - 1, (stats, left)
    assert stats.decoding == 0 and stats.prefill_queue == 0 and stats.decode_held == 0, stats
    assert figures.cases >= PROFILE["cases"] and figures.crashes == 0 and figures.leaks == 0
