"""Regression tests for the abuse defects of issue 10, against a real service (tests/local_service:
engine process, replica and gateway over loopback, tiny model on CPU). Each fails on the code of
commit 7a806ff and passes since; its docstring says what it guards."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from deployments.auth import hash_line, new_key
from deployments.gateway_service import GatewayService
from sinkserve.client import AsyncSession, Credentials, SessionError
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc
from tests.local_service import LocalService, exchange
from tests.service import free_port

pytestmark = pytest.mark.slow

GREEDY = pb.GenerationParams(max_new_tokens=8, temperature=0.0)
OPEN = pb.ClientMessage(open=pb.Open())
CLOSE = pb.ClientMessage(close=pb.Close())
LIMITED_SESSIONS = 4


def append(**fields) -> pb.ClientMessage:
    return pb.ClientMessage(append=pb.Append(**fields))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Credentials]:
    """API keys: `user` (no quota), `other` (another owner), `limited` (max_sessions 4)."""
    lines, made = [], {}
    for name, quota in (("user", {}), ("other", {}), ("limited", {"max_sessions": 4})):
        key, _ = new_key()
        lines.append(hash_line(key, name, **quota))
        made[name] = Credentials(api_key=key)
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text("\n".join(lines) + "\n")
    made["file"] = str(path)
    return made


@pytest.fixture(scope="module")
def service(keys):
    with LocalService(slots=12, api_keys=keys["file"], max_buffered_tokens=64) as running:
        yield running


async def test_an_empty_append_asking_for_a_reply_is_refused_and_the_stream_goes_on(
    service, keys
) -> None:
    """Defect 1: `Append{tokens: [], generate}` (or `text: ""`) as a session's first input hung
    the stream for good (no reply, no error; a later Close never answered). Every failure path
    must reach the client: the append is refused on its own, later turns and Close work."""
    for empty in (
        append(tokens=pb.TokenIds(ids=[]), generate=GREEDY),
        append(text="", generate=GREEDY),
    ):
        session = await AsyncSession.open(service.address, credentials=keys["user"])
        refused = await asyncio.wait_for(session.reply(**_fields(empty)), 30)
        assert refused.end.reason == pb.TurnEnd.REJECTED
        assert "nothing to continue from" in refused.end.detail and refused.ids == []
        assert refused.end.stream_position == 0
        later = await asyncio.wait_for(session.reply(text="hello", generate=GREEDY), 30)
        assert later.end.reason in (pb.TurnEnd.LENGTH, pb.TurnEnd.EOS) and later.ids
        await asyncio.wait_for(session.close(), 30)  # Close answers


async def test_a_refused_append_does_not_discard_the_turn_before_it(service, keys) -> None:
    """Defect 2: a valid `Append{text, generate 200}` followed at once by `Append{tokens: [-5]}`
    ended the stream INVALID_ARGUMENT and delivered none of the first turn's tokens. The bad append
    is refused on its own (TurnEnd REJECTED), in its place, and the first turn runs to the end."""
    long = pb.GenerationParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)
    ended = await exchange(
        service.address,
        [OPEN, append(text="tell me a story", generate=long), append(tokens=pb.TokenIds(ids=[-5]))],
        keys["user"],
    )
    assert ended.code == grpc.StatusCode.OK, ended.details
    first, refused = ended.turn_ends()
    assert first.reason == pb.TurnEnd.LENGTH and first.generated_tokens == 200
    assert sum(len(m.tokens.ids) for m in ended.messages if m.HasField("tokens")) == 200
    assert refused.reason == pb.TurnEnd.REJECTED and "-5" in refused.detail
    assert refused.stream_position == first.stream_position  # nothing of it entered the stream


async def test_one_key_cannot_take_every_slot_with_dropped_streams(service, keys) -> None:
    """Defect 3: every stream dropped without Close kept its slot for session_ttl_s, so one client
    could take all the slots with open-and-drop streams. A key's max_sessions quota stops it (the
    Open past it is RESOURCE_EXHAUSTED naming the quota) and everyone else still gets slots."""
    dropped = []
    for _ in range(LIMITED_SESSIONS):
        session = await AsyncSession.open(service.address, credentials=keys["limited"])
        await session.disconnect()  # dropped without Close: the session stays, with its slot
        dropped.append(session)
    await service.acall(service._update())  # the replica's report reaches the gateway
    for _ in range(3):
        with pytest.raises(SessionError) as refused:
            await AsyncSession.open(service.address, credentials=keys["limited"])
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions" in refused.value.details and "limited" in refused.value.details
    other = await AsyncSession.open(service.address, credentials=keys["user"])
    await other.reply(text="still room", generate=GREEDY)
    await other.close()
    for session in dropped:  # a dropped session resumes and closes, and the key has room again
        resumed = await AsyncSession.resume(
            service.address, session.session_id, session.resume_token, credentials=keys["limited"]
        )
        await resumed.close()
    await service.acall(service._update())
    again = await AsyncSession.open(service.address, credentials=keys["limited"])
    await again.close()


async def test_client_strings_are_not_echoed_without_bound(service, keys) -> None:
    """Defect 4: a 100 KB chat role or session id made the error trailers overflow (the client saw
    RESOURCE_EXHAUSTED "Stream removed"), and a 100 KB session id after a real replica prefix was
    reported as "no free session slot on any replica". Ids are checked at the gateway, and what
    is quoted back is short."""
    huge_id = "r0." + "x" * 100_000
    ended = await exchange(
        service.address,
        [pb.ClientMessage(resume=pb.Resume(session_id=huge_id, resume_token="t"))],
        keys["user"],
    )
    assert ended.code == grpc.StatusCode.INVALID_ARGUMENT, ended.details
    assert "malformed session id" in ended.details and len(ended.details) < 300

    role = append(chat=pb.ChatTurn(role="r" * 100_000, content="hi"), generate=GREEDY)
    ended = await exchange(service.address, [OPEN, role, CLOSE], keys["user"])
    assert ended.code == grpc.StatusCode.OK, ended.details
    (refused,) = ended.turn_ends()
    assert refused.reason == pb.TurnEnd.REJECTED and "unknown chat role" in refused.detail
    assert len(refused.detail) < 300


async def test_message_size_is_a_setting_and_not_mistaken_for_a_full_replica(keys) -> None:
    """Defect 5: messages over 4 MiB got RESOURCE_EXHAUSTED, the code that also means "no free
    slot", the limit was documented nowhere, and the gateway took any RESOURCE_EXHAUSTED before
    a replica's first reply for a full replica. The limit is `max_message_bytes`; a replica's
    refusal counts as "full" only when the replica marks it so."""
    # A replica whose every call ends RESOURCE_EXHAUSTED without the replica's mark (as gRPC
    # itself answers a message over the replica's limit): not a full replica.
    server = grpc.aio.server()

    class Oversized(pb_grpc.StreamingLLMServicer):
        async def Session(self, request_iterator, context):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"
            )
            yield pb.ServerMessage()

    pb_grpc.add_StreamingLLMServicer_to_server(Oversized(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gateway = GatewayService()
    gateway_port = free_port()
    gateway_server = await gateway.start("127.0.0.1", gateway_port)
    try:
        await gateway.update(
            [{"replica_id": "r9", "address": f"127.0.0.1:{port}", "slots_free": 10}]
        )
        ended = await exchange(f"127.0.0.1:{gateway_port}", [OPEN])
        assert ended.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no free session slot" not in ended.details
    finally:
        await gateway.close()
        await gateway_server.stop(0)
        await server.stop(0)

    with LocalService(slots=2, max_message_bytes=64 * 1024) as small:
        big = append(text="a" * 100_000)
        ended = await exchange(small.address, [OPEN, big])
        assert ended.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in ended.details and str(64 * 1024) in ended.details
        fits = await exchange(small.address, [OPEN, append(text="a" * 30_000), CLOSE])
        assert fits.code == grpc.StatusCode.OK, fits.details


async def test_a_dead_replica_address_does_not_reach_the_client() -> None:
    """Defect 6: the gateway forwarded a replica's transport error text to the client, e.g.
    `failed to connect ... ipv4:10.x.y.z:34921: Connection refused`. The client gets a stable
    message with no internal address; the detail goes to the gateway's log."""
    gateway = GatewayService()
    gateway_port, dead_port = free_port(), free_port()
    server = await gateway.start("127.0.0.1", gateway_port)
    try:
        await gateway.update(
            [{"replica_id": "r7", "address": f"127.0.0.1:{dead_port}", "slots_free": 10}]
        )
        resume = pb.Resume(session_id="r7." + "a" * 32, resume_token="x")
        for first in (OPEN, pb.ClientMessage(resume=resume)):
            ended = await exchange(f"127.0.0.1:{gateway_port}", [first])
            assert ended.code == grpc.StatusCode.UNAVAILABLE
            assert "127.0.0.1" not in ended.details and str(dead_port) not in ended.details
            assert "ipv4" not in ended.details and "connect" not in ended.details
    finally:
        await gateway.close()
        await server.stop(0)


async def test_a_client_that_stops_reading_stops_its_session_not_others(service, keys) -> None:
    """Defect 7: a client that read nothing still got its reply generated at full speed, and such
    clients slowed everyone. When a stream's client stops taking replies (its flow-control window
    is full), the replica's buffer for it fills and its session stops decoding; a canary session
    keeps answering meanwhile; once the client reads again, the reply goes on to its end."""
    # A client whose transport takes at most 1 KiB unread (gRPC's default grows its window with
    # BDP probing, so it keeps taking replies into its own memory whether the app reads or not).
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    from sinkwire.channels import aio_channel

    reply_tokens = 3000
    async with aio_channel(service.address, keys["user"], options) as channel:
        call = pb_grpc.StreamingLLMStub(channel).Session()
        await call.write(OPEN)
        assert (await call.read()).HasField("opened")
        params = pb.GenerationParams(max_new_tokens=reply_tokens, ignore_eos=True, temperature=0.0)
        await call.write(append(tokens=pb.TokenIds(ids=[1, 2, 3]), generate=params))
        held_at = await _until_decode_held(service, timeout_s=120)
        assert held_at < reply_tokens, "the whole reply was generated for a client not reading"
        canary = await AsyncSession.open(service.address, credentials=keys["other"])
        started = time.monotonic()
        answer = await asyncio.wait_for(canary.reply(text="canary", generate=GREEDY), 30)
        assert len(answer.ids) == GREEDY.max_new_tokens
        assert time.monotonic() - started < 10
        await canary.close()
        generated = service.stats().generated_tokens
        assert generated - held_at <= GREEDY.max_new_tokens + 8  # the held one made ~nothing
        received, end = 0, None
        while end is None:  # read again: the reply goes on to its end
            message = await asyncio.wait_for(call.read(), 60)
            received += len(message.tokens.ids)
            end = message.turn_end if message.HasField("turn_end") else None
        assert end.reason == pb.TurnEnd.LENGTH and received == reply_tokens
        assert service.stats().decode_held == 0
        await call.write(CLOSE)
        assert (await call.read()).HasField("closed")


async def test_a_stream_dropped_while_its_session_opens_leaves_no_session(service, keys) -> None:
    """Found by fuzzing: a client that dropped its stream while the replica was opening its
    session left the session in the engine, with its slot, forever (nobody knew its id, so it
    could neither be resumed nor expire)."""
    engine = service.engine
    open_session = engine.open_session
    opening, opened = threading.Event(), threading.Event()

    async def slow_open(*args, **kwargs):  # the command is sent; its answer comes late
        opening.set()
        started = asyncio.ensure_future(open_session(*args, **kwargs))
        await asyncio.sleep(1.0)
        try:
            return await started
        finally:
            opened.set()

    before = service.stats().sessions
    engine.open_session = slow_open
    try:
        from sinkwire.channels import aio_channel

        async with aio_channel(service.address, keys["user"]) as channel:
            call = pb_grpc.StreamingLLMStub(channel).Session()
            await call.write(OPEN)
            assert await asyncio.to_thread(opening.wait, 30), "the replica never opened it"
            call.cancel()  # while the replica is opening the session
        assert await asyncio.to_thread(opened.wait, 30), "the engine never answered the open"
    finally:
        engine.open_session = open_session
    deadline = time.monotonic() + 30
    while service.stats().sessions != before:
        assert time.monotonic() < deadline, "the session of a dropped open stayed in the engine"
        await asyncio.sleep(0.1)


async def _until_decode_held(service: LocalService, timeout_s: float) -> int:
    """The engine's generated-token count once it reports the session's decoding held."""
    deadline = time.monotonic() + timeout_s
    while service.stats().decode_held != 1:
        assert time.monotonic() < deadline, "the engine never held the unread session"
        await asyncio.sleep(0.1)
    return service.stats().generated_tokens


def _fields(message: pb.ClientMessage) -> dict:
    """An Append message as AsyncSession.reply keyword arguments."""
    a = message.append
    kind = a.WhichOneof("input")
    value = {"text": a.text, "tokens": list(a.tokens.ids), "chat": (a.chat.role, a.chat.content)}[
        kind
    ]
    return {kind: value, "generate": a.generate}
