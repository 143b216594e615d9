"""The Serve application end to end: real Ray started here, real gRPC over loopback, tiny model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sinkserve.client import AsyncSession, GenerationParams, SessionError
from sinkwire.status import retry_after_s
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc
from tests.service import running_service

pytestmark = pytest.mark.slow

SLOTS = 40  # per replica
GREEDY = GenerationParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def address():
    with running_service(model="tiny", replicas=2, slots=SLOTS, sink=4, window=60) as addr:
        yield addr


async def raw_stream(address: str, *messages: pb.ClientMessage) -> list[pb.ServerMessage]:
    """Send messages on a fresh stream with no project client; return what came back."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.StreamingLLMStub(channel).Session(iter(messages))
        return [m async for m in call]


def status_of(error: BaseException) -> grpc.StatusCode:
    return error.code if isinstance(error, SessionError) else error.code()


async def test_sessions_are_sticky_and_spread_over_replicas(address) -> None:
    async def converse(i: int) -> tuple[str, set[str], list[int]]:
        session = await AsyncSession.open(address)
        names, positions = set(), []
        for turn in range(3):
            async for message in session.append(
                chat=("user", f"hello {i}.{turn}"), generate=GREEDY
            ):
                names.add(message.replica_id)
                if message.HasField("turn_end"):
                    positions.append(message.turn_end.stream_position)
        await session.close()
        return session.replica_id, names, positions

    results = await asyncio.gather(*(converse(i) for i in range(50)))
    for opened_on, names, positions in results:
        assert names == {opened_on}, "a message named a replica other than the session's"
        assert positions == sorted(positions) and len(set(positions)) == 3
    replicas = {opened_on for opened_on, _, _ in results}
    assert len(replicas) == 2, f"sessions were not spread: {replicas}"


async def test_drop_mid_generation_and_resume(address) -> None:
    session = await AsyncSession.open(address)
    await session.send(
        pb.ClientMessage(
            append=pb.Append(text="a long story", generate=pb.GenerationParams(max_new_tokens=400))
        )
    )
    seen = 0
    while seen < 5:  # read a few token messages, then drop the stream mid-reply
        message = await session.receive()
        assert message.HasField("tokens")
        seen = message.tokens.stream_position
    await session.disconnect()

    resumed = await AsyncSession.resume(address, session.session_id, session.resume_token)
    assert resumed.opened.resumed and resumed.replica_id == session.replica_id
    position = resumed.opened.stream_position
    assert position >= seen
    reply = await resumed.reply(text=" and then", generate=GREEDY)
    end = reply.end
    assert end.stream_position == position + end.input_tokens + end.generated_tokens
    await resumed.close()

    with pytest.raises(SessionError) as wrong:
        await AsyncSession.resume(address, session.session_id, "not-the-token")
    assert wrong.value.code == grpc.StatusCode.PERMISSION_DENIED

    other = await AsyncSession.open(address)
    with pytest.raises(SessionError) as denied:
        await AsyncSession.resume(address, other.session_id, session.resume_token)
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    await other.close()


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        (
            [pb.ClientMessage(resume=pb.Resume(session_id="nope." + "0" * 32, resume_token="x"))],
            "NOT_FOUND",
        ),
        (
            [pb.ClientMessage(resume=pb.Resume(session_id="nope.123", resume_token="x"))],
            "INVALID_ARGUMENT",
        ),
        ([pb.ClientMessage(append=pb.Append(text="hi"))], "FAILED_PRECONDITION"),
        ([pb.ClientMessage()], "FAILED_PRECONDITION"),
        ([pb.ClientMessage(open=pb.Open()), pb.ClientMessage()], "INVALID_ARGUMENT"),
        (
            [pb.ClientMessage(open=pb.Open()), pb.ClientMessage(open=pb.Open())],
            "FAILED_PRECONDITION",
        ),
    ],
)
async def test_bad_input_gets_a_status_and_the_server_keeps_serving(
    address, messages, code
) -> None:
    healthy = await AsyncSession.open(address)
    reply_task = asyncio.create_task(
        healthy.reply(
            text="keep going", generate=GenerationParams(max_new_tokens=30, ignore_eos=True)
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await raw_stream(address, *messages)
    assert error.value.code() == getattr(grpc.StatusCode, code)
    assert error.value.details() and "\n" not in error.value.details()
    reply = await reply_task
    assert len(reply.ids) == 30  # the other session was not disturbed
    await healthy.close()
    fresh = await AsyncSession.open(address)
    await fresh.reply(text="still here", generate=GREEDY)
    await fresh.close()


@pytest.mark.parametrize(
    "append",
    [
        pb.Append(tokens=pb.TokenIds(ids=[10**7])),
        pb.Append(text="x", generate=pb.GenerationParams(temperature=-1.0)),
        pb.Append(),
        pb.Append(chat=pb.ChatTurn(role="robot", content="x")),
    ],
    ids=["token-out-of-range", "bad-temperature", "no-input", "unknown-role"],
)
async def test_an_invalid_append_is_refused_on_its_own(address, append) -> None:
    """It gets a TurnEnd REJECTED with the reason; the turns around it and the stream go on."""
    messages = await raw_stream(
        address,
        pb.ClientMessage(open=pb.Open()),
        pb.ClientMessage(append=pb.Append(text="before", generate=GREEDY)),
        pb.ClientMessage(append=append),
        pb.ClientMessage(append=pb.Append(text="after", generate=GREEDY)),
        pb.ClientMessage(close=pb.Close()),
    )
    ends = [m.turn_end for m in messages if m.HasField("turn_end")]
    assert [e.reason == pb.TurnEnd.REJECTED for e in ends] == [False, True, False]
    assert ends[1].detail and "\n" not in ends[1].detail
    assert messages[-1].HasField("closed")


async def test_idle_sessions_make_room_and_only_a_busy_service_refuses(address) -> None:
    """More sessions than slots: idle ones leave the GPU (their next message rebuilds them), so
    opens succeed; only when every slot holds a session in a conversation (a reply in flight, or
    one that ended moments ago) is an Open refused (RESOURCE_EXHAUSTED, with a retry hint), and
    that refusal hurts nothing."""

    async def stats() -> pb.StatsResponse:
        async with grpc.aio.insecure_channel(address) as channel:
            return await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest())

    keeper = await AsyncSession.open(address)
    before = await keeper.reply(text="remember this", generate=GREEDY)
    total = (await stats()).slots_total
    sessions = [keeper] + [await AsyncSession.open(address) for _ in range(total + 10)]
    for _ in range(300):  # Stats may answer from a replica's last engine figures: until fresh
        if (await stats()).sessions_offloaded >= 11:  # the keeper among them: idle longest
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("fewer than 11 idle sessions left the GPU in 30 s")
    again = await keeper.reply(text="still fine", generate=GREEDY)  # rebuilt, then answered
    assert again.end.stream_position == (
        before.end.stream_position + again.end.input_tokens + again.end.generated_tokens
    )

    long = GenerationParams(max_new_tokens=100_000, temperature=0.0, ignore_eos=True)
    by_replica: dict[str, list[AsyncSession]] = {}
    for session in sessions[1:]:
        by_replica.setdefault(session.replica_id, []).append(session)
    while min(len(group) for group in by_replica.values()) < SLOTS:  # enough on each replica
        session = await AsyncSession.open(address)
        sessions.append(session)
        by_replica[session.replica_id].append(session)
    busy = [s for group in by_replica.values() for s in group[:SLOTS]]
    for session in busy:  # every slot of every replica busy
        await session.send(pb.ClientMessage(append=pb.Append(text="go on", generate=long)))
    # Until every one of them is generating (its first reply tokens came: it holds a slot; an
    # offloaded one is rebuilt first). A slot count says nothing here: idle sessions fill the
    # slots before any busy append lands.
    await asyncio.wait_for(asyncio.gather(*(_until_tokens(s) for s in busy)), 120)
    with pytest.raises(SessionError) as full:
        await AsyncSession.open(address)
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_after_s(full.value.details) is not None, full.value.details
    for session in busy:
        await session.cancel()
    # Until every reply has ended (its TurnEnd came), not only the Cancels sent.
    await asyncio.wait_for(asyncio.gather(*(_until_turn_end(s) for s in busy)), 120)
    # Room again once the replies end and their conversations pause; until then each refusal
    # says when to try again.
    for _ in range(30):
        try:
            replacement = await AsyncSession.open(address)
            break
        except SessionError as refused:
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
            wait = retry_after_s(refused.details)
            assert wait is not None, refused.details
            await asyncio.sleep(min(wait, 1.0))
    else:
        raise AssertionError("no room for a new session 30 tries after every reply ended")
    sessions.append(replacement)
    await asyncio.gather(*(s.close() for s in sessions))


async def _until_tokens(session: AsyncSession) -> None:
    while not (await session.receive()).HasField("tokens"):
        pass


async def _until_turn_end(session: AsyncSession) -> None:
    while not (await session.receive()).HasField("turn_end"):
        pass


def test_health_stats_and_a_client_from_the_proto_alone(address, tmp_path) -> None:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stats = pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest())
    assert len(stats.replicas) == 2 and stats.slots_total == 2 * SLOTS

    # Generate a client from the installed .proto into a scratch dir, under another module path,
    # and use it from a process that imports none of the project's code.
    from grpc_tools import protoc

    from sinkwire.protos import PROTO_FILE, proto_root

    (tmp_path / "contract.proto").write_text((proto_root() / PROTO_FILE).read_text())
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{tmp_path}",
                f"--python_out={tmp_path}",
                f"--grpc_python_out={tmp_path}",
                "contract.proto",
            ]
        )
        == 0
    )
    script = textwrap.dedent(
        f"""
        import sys, grpc
        import contract_pb2 as pb, contract_pb2_grpc as rpc
        channel = grpc.insecure_channel("{address}")
        replies = rpc.StreamingLLMStub(channel).Session(iter([
            pb.ClientMessage(open=pb.Open()),
            pb.ClientMessage(append=pb.Append(
                chat=pb.ChatTurn(role="user", content="hi"),
                generate=pb.GenerationParams(max_new_tokens=5, temperature=0.0))),
        ]))
        tokens = 0
        for message in replies:
            if message.HasField("tokens"):
                tokens += len(message.tokens.ids)
            if message.HasField("turn_end"):
                break
        assert not any(name.split(".")[0] in ("sinkserve", "sinkcache", "deployments") for name in sys.modules)
        print("tokens", tokens)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["tokens", "5"]
