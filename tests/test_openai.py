"""The OpenAI-compatible HTTP door (issue 22), driven with the official `openai` package: the
Responses API (streaming and not, chains by previous_response_id), Chat Completions with and
without a session key, and every error status. A real Ray-free service (tests/local_service.py)
with API keys and TLS, its HTTP door on the gateway's own event loop; the replica-kill chain runs on
the real Ray Serve application (tests/service.py)."""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from deployments.auth import hash_line, new_key
from deployments.openai_front import HttpDoor, OpenAIFront
from deployments.openai_wire import ResponseRef, parse_response_id
from sinkwire.channels import Credentials, aio_channel
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc
from tests.certs import CertFiles, make_certs
from tests.local_service import LocalService
from tests.service import free_port, running_service

MODEL = "tiny"
SHORT = {"max_output_tokens": 6, "temperature": 0.0}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """user and other (two owners), limited (one session at a time), admin (Stats)."""
    specs = {
        "user": {"name": "user"},
        "other": {"name": "other"},
        "limited": {"name": "limited", "max_sessions": 1},
        "admin": {"name": "ops", "admin": True},
    }
    lines, made = [], {}
    for label, spec in specs.items():
        key, _ = new_key()
        lines.append(hash_line(key, **spec))
        made[label] = key
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text("\n".join(lines) + "\n")
    made["file"] = str(path)
    return made


@pytest.fixture(scope="module")
def service(keys, certs):
    """Keys and TLS on both doors; one HTTP door serving, a second over the same gateway that is
    made to drain."""
    with LocalService(
        slots=16,
        window=200,
        api_keys=keys["file"],
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
    ) as running:
        tls = {"tls_cert": certs.server_cert, "tls_key": certs.server_key}
        door = HttpDoor(OpenAIFront(running.gateway, MODEL))
        draining = HttpDoor(OpenAIFront(running.gateway, MODEL))
        running.http_port = running.call(door.start("127.0.0.1", 0, **tls))
        running.draining_port = running.call(draining.start("127.0.0.1", 0, **tls))
        # What a stopping gateway's door answers on connections still open (stop() sets it,
        # then closes the listening socket so new connections go to a sibling gateway).
        draining.front.draining = True
        try:
            yield running
        finally:
            running.call(door.stop(grace_s=1))
            running.call(draining.stop(grace_s=1))


def client(service, certs, key: str | None, port: int | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"https://localhost:{port or service.http_port}/v1",
        api_key=key or "none",
        max_retries=0,
        timeout=60,
        http_client=openai.DefaultHttpxClient(verify=certs.ca),
    )


@pytest.fixture(scope="module")
def user(service, certs, keys) -> openai.OpenAI:
    return client(service, certs, keys["user"])


def place(response) -> dict:
    """sinkserve's extension: where a response sits in its session."""
    return response.model_extra["sinkserve"]


# -- GET --------------------------------------------------------------------------------------------
def test_models_and_health(service, certs, user) -> None:
    assert [m.id for m in user.models.list().data] == [MODEL]
    context = ssl.create_default_context(cafile=certs.ca)
    url = f"https://localhost:{service.http_port}/health"
    with urllib.request.urlopen(url, context=context, timeout=10) as answer:  # no key needed
        assert answer.status == 200 and json.load(answer)["status"] == "ok"


# -- Responses --------------------------------------------------------------------------------------
def test_a_response_without_streaming(user) -> None:
    response = user.responses.create(model=MODEL, input="Hello there", **SHORT)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "incomplete"  # greedy on a random model: six tokens, no EOS
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 6 and response.usage.input_tokens > 0
    assert response.output_text == response.output[0].content[0].text
    where = place(response)
    assert where["start_position"] == 0
    assert where["end_position"] == response.usage.input_tokens + response.usage.output_tokens
    ref = parse_response_id(response.id)
    assert (ref.session_id, ref.start) == (where["session_id"], 0)


def test_a_streamed_response_has_the_responses_event_sequence(user) -> None:
    events = list(user.responses.create(model=MODEL, input="Stream me", stream=True, **SHORT))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # max_output_tokens reached
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == events[-4].text == final.output_text
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    assert final.usage.output_tokens == 6


def test_a_chain_of_twenty_responses_has_continuous_positions(user) -> None:
    """Each response continues exactly where the previous one left its session."""
    previous, session_id, end = None, None, 0
    for turn in range(20):
        stream = turn % 2 == 1  # streaming and not, alternately
        kwargs = {"previous_response_id": previous} if previous else {}
        if stream:  # the SDK's stream() helper wants response.completed; this one is incomplete
            events = user.responses.create(
                model=MODEL, input=f"turn {turn}", stream=True, **SHORT, **kwargs
            )
            response = list(events)[-1].response
        else:
            response = user.responses.create(model=MODEL, input=f"turn {turn}", **SHORT, **kwargs)
        where = place(response)
        session_id = session_id or where["session_id"]
        assert where["session_id"] == session_id
        assert where["start_position"] == end, f"turn {turn} began at a gap"
        usage = response.usage
        assert where["end_position"] == end + usage.input_tokens + usage.output_tokens
        assert response.previous_response_id == previous
        previous, end = response.id, where["end_position"]
    assert end > 20 * 6


def test_only_the_latest_response_of_a_session_continues(user) -> None:
    first = user.responses.create(model=MODEL, input="one", **SHORT)
    second = user.responses.create(model=MODEL, input="two", previous_response_id=first.id, **SHORT)
    with pytest.raises(openai.ConflictError) as refused:
        user.responses.create(model=MODEL, input="fork", previous_response_id=first.id, **SHORT)
    assert refused.value.status_code == 409
    assert refused.value.body["code"] == "response_superseded"
    third = user.responses.create(model=MODEL, input="go", previous_response_id=second.id, **SHORT)
    assert place(third)["start_position"] == place(second)["end_position"]


def test_instructions_and_message_input(user) -> None:
    plain = user.responses.create(model=MODEL, instructions="Be brief.", input="Hi", **SHORT)
    with_system = user.responses.create(
        model=MODEL,
        instructions="Be brief. Be very brief, brief as a haiku is brief.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        **SHORT,
    )
    assert with_system.instructions.startswith("Be brief. Be very")
    assert with_system.usage.input_tokens > plain.usage.input_tokens  # the system turn is in


# -- Chat Completions -------------------------------------------------------------------------------
def test_chat_with_a_session_key_appends_only_new_messages(user, service) -> None:
    key = f"chat-{time.monotonic_ns()}"
    headers = {"x-session-id": key}
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "A"}]
    first = user.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, extra_headers=headers
    )
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "B"},
    ]
    second = user.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, extra_headers=headers
    )
    one, two = place(first), place(second)
    assert two["session_id"] == one["session_id"]
    assert two["start_position"] == one["end_position"]  # nothing re-fed
    # Only the new user message was consumed: a keyless request with the whole conversation
    # consumes more.
    whole = user.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert second.usage.prompt_tokens < whole.usage.prompt_tokens
    # Streaming, with the `user` field as the key this time.
    messages += [
        {"role": "assistant", "content": second.choices[0].message.content},
        {"role": "user", "content": "C"},
    ]
    chunks = list(
        user.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # A conversation that does not extend what the session consumed is refused, not re-fed.
    diverged = [*messages[:2], {"role": "assistant", "content": text + " (edited)"}]
    diverged.append({"role": "user", "content": "D"})
    with pytest.raises(openai.BadRequestError) as refused:
        user.chat.completions.create(
            model=MODEL, messages=diverged, max_tokens=5, extra_headers=headers
        )
    assert refused.value.body["code"] == "conversation_mismatch"
    assert refused.value.body["param"] == "messages[2]"
    with pytest.raises(openai.BadRequestError):  # nothing new
        user.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=5, extra_headers=headers
        )
    # `user` names a session too (a different key: a new session).
    by_user = user.chat.completions.create(
        model=MODEL, messages=messages[:2], max_tokens=5, user=key + "-u"
    )
    assert place(by_user)["session_id"] != one["session_id"]


def test_chat_without_a_key_lives_for_one_request(user, service) -> None:
    reply = user.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "once"}], max_tokens=4
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    session_id = place(reply)["session_id"]

    async def held() -> bool:
        return session_id in service.sessions.entries

    assert not service.call(held())


# -- errors -----------------------------------------------------------------------------------------
def test_a_missing_or_unknown_key_is_401(service, certs, keys) -> None:
    for key in (None, new_key()[0]):
        with pytest.raises(openai.AuthenticationError) as refused:
            client(service, certs, key).responses.create(model=MODEL, input="x", **SHORT)
        assert refused.value.status_code == 401
        assert refused.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        client(service, certs, None).models.list()


def test_unknown_closed_and_foreign_response_ids_are_404(service, certs, keys, user) -> None:
    made = user.responses.create(model=MODEL, input="mine", **SHORT)
    ref = parse_response_id(made.id)
    unknown = [
        "resp_nonsense",
        ResponseRef("r0." + "0" * 32, ref.resume_token, 0).response_id(),  # no such session
    ]
    for response_id in unknown:
        with pytest.raises(openai.NotFoundError) as refused:
            user.responses.create(model=MODEL, input="x", previous_response_id=response_id)
        assert refused.value.body["param"] == "previous_response_id"
    other = client(service, certs, keys["other"])
    with pytest.raises(openai.NotFoundError):  # another key's session
        other.responses.create(model=MODEL, input="x", previous_response_id=made.id)
    # Closed (as an expired one is gone): 404 too.
    _close_over_grpc(service, keys["user"], certs, ref)
    with pytest.raises(openai.NotFoundError):
        user.responses.create(model=MODEL, input="x", previous_response_id=made.id)


def _close_over_grpc(service, key: str, certs, ref: ResponseRef) -> None:
    async def close() -> None:
        credentials = Credentials(api_key=key, ca=certs.ca)
        async with aio_channel(service.address, credentials) as channel:
            call = pb_grpc.StreamingLLMStub(channel).Session(
                iter(
                    [
                        pb.ClientMessage(
                            resume=pb.Resume(
                                session_id=ref.session_id, resume_token=ref.resume_token
                            )
                        ),
                        pb.ClientMessage(close=pb.Close()),
                    ]
                )
            )
            kinds = [message.WhichOneof("kind") async for message in call]
            assert kinds == ["opened", "closed"]

    import asyncio

    asyncio.run(close())


def test_over_quota_is_429(service, certs, keys) -> None:
    limited = client(service, certs, keys["limited"])
    limited.responses.create(model=MODEL, input="first", **SHORT)  # its one session, kept
    with pytest.raises(openai.RateLimitError) as refused:
        limited.responses.create(model=MODEL, input="second", **SHORT)
    assert refused.value.status_code == 429 and "max_sessions" in refused.value.message


def test_unsupported_fields_and_values_are_400_not_ignored(user) -> None:
    cases = [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"truncation": "auto"}, "truncation"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"store": False}, "store"),
        ({"temperature": 3.0}, "temperature"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            user.responses.create(model=MODEL, input="x", **extra)
        assert refused.value.body["param"] == param, extra
    with pytest.raises(openai.BadRequestError) as refused:
        user.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], logit_bias={"1": 5}
        )
    assert refused.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError):
        user.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.NotFoundError) as refused:
        user.responses.create(model="gpt-4o", input="x")
    assert refused.value.body["code"] == "model_not_found"


def test_a_draining_door_answers_503(service, certs, keys) -> None:
    draining = client(service, certs, keys["user"], port=service.draining_port)
    with pytest.raises(openai.InternalServerError) as refused:
        draining.responses.create(model=MODEL, input="x", **SHORT)
    assert refused.value.status_code == 503 and refused.value.body["code"] == "draining"
    context = ssl.create_default_context(cafile=certs.ca)
    url = f"https://localhost:{service.draining_port}/health"
    with pytest.raises(urllib.error.HTTPError) as health:
        urllib.request.urlopen(url, context=context, timeout=10)
    assert health.value.code == 503


def test_the_http_door_speaks_tls_only(service, keys) -> None:
    plain = openai.OpenAI(
        base_url=f"http://localhost:{service.http_port}/v1",
        api_key=keys["user"],
        max_retries=0,
        timeout=10,
    )
    with pytest.raises(openai.APIConnectionError):
        plain.models.list()


# -- on Ray Serve: a chain that outlives its replica ------------------------------------------------
@pytest.mark.slow
def test_a_chain_survives_the_loss_of_its_replica(tmp_path) -> None:
    """Ray Serve, two replicas, a SQLite store: a chain of responses goes on after the replica
    holding its session is SIGKILLed, resumed from the store exactly where the last response
    ended."""
    http_port = free_port()
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    with running_service(
        model="tiny", replicas=2, slots=32, window=200, session_store=store, openai_port=http_port
    ) as address:
        api = openai.OpenAI(
            base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0, timeout=60
        )
        previous, end, replica = None, 0, None
        for turn in range(3):
            kwargs = {"previous_response_id": previous} if previous else {}
            response = api.responses.create(model=MODEL, input=f"t{turn}", **SHORT, **kwargs)
            assert place(response)["start_position"] == end
            previous, end, replica = response.id, place(response)["end_position"], place(response)
        pid = _replica_pid(address, replica["replica_id"])
        os.kill(pid, signal.SIGKILL)
        print(f"killed replica {replica['replica_id']} (pid {pid})")
        deadline = time.monotonic() + 60
        while True:  # until a gateway routes the resume to the other replica
            try:
                response = api.responses.create(
                    model=MODEL, input="after", previous_response_id=previous, **SHORT
                )
                break
            except openai.InternalServerError as error:
                assert error.status_code == 503, error
                assert time.monotonic() < deadline, f"no replica took the session: {error}"
                time.sleep(0.5)
        after = place(response)
        assert after["start_position"] == end  # the stream went on where it stood
        assert after["rebuilt"] and after["replica_id"] != replica["replica_id"]
        for turn in range(3):
            more = api.responses.create(
                model=MODEL, input=f"m{turn}", previous_response_id=response.id, **SHORT
            )
            assert place(more)["start_position"] == place(response)["end_position"]
            response = more


def _replica_pid(address: str, replica_id: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stats = pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=10)
    return next(r.pid for r in stats.replicas if r.replica_id == replica_id)


def test_response_ids_round_trip_and_refuse_forgeries() -> None:
    ref = ResponseRef("abc-1." + "f" * 32, "tok_en-", 42)
    assert parse_response_id(ref.response_id()) == ref
    bad = base64.urlsafe_b64encode(b"not a session:t:1").decode()
    for response_id in ("resp_", "resp_" + bad, "msg_x", "resp_" + "A" * 500):
        with pytest.raises(Exception, match="not found"):
            parse_response_id(response_id)


async def test_the_load_test_drives_the_http_door(service, certs, keys) -> None:
    """`sinkserve loadtest --protocol openai`: conversations chained by previous_response_id,
    each turn continuing where the last ended."""
    from sinkserve.loadtest import LoadConfig, run, summary

    config = LoadConfig(
        target=service.address,
        sessions=4,
        duration_s=6,
        ramp_s=1,
        think_s=(0.1, 0.3),
        max_new_tokens=6,
        credentials=Credentials(api_key=keys["admin"], ca=certs.ca),
        protocol="openai",
        openai_url=f"https://localhost:{service.http_port}/v1",
    )
    data = summary(config, await run(config))
    print("loadtest over HTTP:", {k: data[k] for k in ("turns", "errors", "ttft_ms", "itl_ms")})
    assert data["sessions_opened"] == 4 and data["sessions_lost"] == 0
    assert data["errors"] == {} and data["position_errors"] == 0
    assert data["turns"] >= 8 and 0 < data["ttft_ms"]["count"] <= data["turns"]
