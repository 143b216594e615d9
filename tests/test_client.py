"""The client's session core without a network, and the blocking client against a real service:
resuming does not leave threads behind, and a send on a stream the server ended says so."""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest

from sinkserve.client import GenerationParams, ResumePolicy, Session, SessionError, StreamResumed
from sinkserve.session_core import (
    CANCEL,
    OPEN,
    SessionCore,
    resume_message,
    stream_ended,
)
from sinkwire.v1 import streaming_llm_pb2 as pb

UNAVAILABLE = SessionError(grpc.StatusCode.UNAVAILABLE, "replica gone")


class FakeClock:
    """Time that moves only when the test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def opened(position: int, session_id: str = "s1", token: str = "t1") -> pb.ServerMessage:
    return pb.ServerMessage(
        opened=pb.Opened(session_id=session_id, resume_token=token, stream_position=position)
    )


def tokens(position: int) -> pb.ServerMessage:
    return pb.ServerMessage(tokens=pb.Tokens(ids=[1], text="a", stream_position=position))


def started_core(position: int = 10, **kwargs) -> SessionCore:
    core = SessionCore(OPEN, **kwargs)
    core.stream_started(opened(position))
    return core


# -- the sans-IO core --------------------------------------------------------------------------------
def test_the_first_stream_starts_as_asked_and_every_later_one_resumes_the_session() -> None:
    core = SessionCore(resume_message("given", "token"))
    assert core.start_message().resume.session_id == "given"
    core.stream_started(opened(7, session_id="given", token="newer"))
    assert core.start_message() == resume_message("given", "newer")  # the newest token
    assert SessionCore(OPEN).start_message() == OPEN
    with pytest.raises(ValueError):
        SessionCore(CANCEL)


def test_a_stream_that_does_not_start_with_opened_is_an_error_and_changes_nothing() -> None:
    core = started_core(10)
    with pytest.raises(SessionError) as error:
        core.stream_started(tokens(11))
    assert error.value.code == grpc.StatusCode.UNKNOWN
    assert core.opened.stream_position == 10 and core.seen == 10


def test_the_furthest_position_seen_follows_the_messages_that_report_one() -> None:
    core = started_core(10)
    core.received(tokens(12))
    core.received(pb.ServerMessage(scores=pb.Scores(logprobs=[-1.0], first_position=99)))
    assert core.seen == 12
    core.received(pb.ServerMessage(turn_end=pb.TurnEnd(stream_position=15)))
    core.received(tokens(14))  # never backwards
    assert core.seen == 15


def test_a_broken_stream_resumes_with_exponential_backoff_until_the_policy_runs_out() -> None:
    clock = FakeClock()
    policy = ResumePolicy(timeout_s=2.0, first_backoff_s=0.1, max_backoff_s=0.5)
    core = started_core(resume_policy=policy, clock=clock)
    recovery = core.stream_broke(UNAVAILABLE)
    delays = []
    while (delay := recovery.next_delay()) is not None:
        delays.append(delay)
        clock.sleep(delay)
        recovery.failed(SessionError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no slot yet"))
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]  # the next 0.5 would pass the 2 s
    assert recovery.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED  # the last try's error
    assert core.resumes == 0


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ABORTED]
)
def test_a_try_that_finds_the_session_gone_stops_the_tries(code: grpc.StatusCode) -> None:
    core = started_core(clock=FakeClock())
    recovery = core.stream_broke(UNAVAILABLE)
    assert recovery.next_delay() is not None
    recovery.failed(SessionError(code, "gone"))
    assert recovery.next_delay() is None
    assert recovery.error.code == code


@pytest.mark.parametrize("why", ["no policy", "code not resumed", "dropped"])
def test_a_stream_that_is_not_resumed_gives_its_error_at_once(why: str) -> None:
    core = started_core(resume_policy=None if why == "no policy" else ResumePolicy())
    error = UNAVAILABLE
    if why == "code not resumed":
        error = SessionError(grpc.StatusCode.PERMISSION_DENIED, "no")
    if why == "dropped":
        core.drop()
    recovery = core.stream_broke(error)
    assert recovery.next_delay() is None
    assert recovery.error is error


def test_a_resume_says_where_the_stream_stands_and_counts_lost_tokens_once() -> None:
    clock = FakeClock()
    core = started_core(10, clock=clock)
    core.received(tokens(25))
    clock.sleep(3.0)
    recovery = core.stream_broke(UNAVAILABLE)
    clock.sleep(recovery.next_delay())
    core.stream_started(opened(20))  # rebuilt from a checkpoint behind what the client saw
    resumed = recovery.resumed()
    assert isinstance(resumed, StreamResumed) and resumed.cause is UNAVAILABLE
    assert (resumed.stream_position, resumed.lost_tokens, resumed.failed_at) == (20, 5, 1003.0)
    assert core.resumes == 1 and recovery.next_delay() is None
    # The next break right away: the 5 tokens were counted already.
    again = core.stream_broke(UNAVAILABLE)
    core.stream_started(opened(20))
    assert again.resumed().lost_tokens == 0 and core.resumes == 2


def test_a_stream_that_ended_without_an_error_status_is_unknown() -> None:
    for code in (None, grpc.StatusCode.OK):
        assert stream_ended(code, "").code == grpc.StatusCode.UNKNOWN
    error = stream_ended(grpc.StatusCode.UNAVAILABLE, "", "before it opened")
    assert (error.code, error.details) == (grpc.StatusCode.UNAVAILABLE, "before it opened")


# -- the blocking client against a real service ----------------------------------------------------------
SHORT = GenerationParams(max_new_tokens=2, ignore_eos=True, temperature=0.0)
# Long enough that only a cut stream ends it early, short enough to end if nothing cuts it.
LONG = GenerationParams(max_new_tokens=2000, ignore_eos=True, temperature=0.0)
RESUMES = 30
THREAD_SLACK = 4  # threads a client may start and end on its own (grpc's polling thread...)


@pytest.fixture(scope="module")
def service():
    from tests.local_service import LocalService

    with LocalService(slots=4, session_store="off") as running:
        yield running


def end_streams(service) -> None:
    """End every attached stream on the replica, as a draining replica does (UNAVAILABLE);
    the sessions stay."""

    async def end() -> None:
        service.sessions.end_streams()

    service.call(end())


def until_detached(service, session_id: str) -> None:
    """Wait until the replica reports no stream attached to the session."""

    async def attached() -> bool:
        return service.sessions.entries[session_id].stream is not None

    deadline = time.monotonic() + 30
    while service.call(attached()):
        assert time.monotonic() < deadline, "the replica kept the stream it was told to end"
        time.sleep(0.01)


def client_threads(baseline: set[threading.Thread]) -> list[str]:
    """Threads started since `baseline`, but those of the service's event loop (asyncio_N: its
    executor grows with its load), which runs in this process too."""
    return [
        thread.name
        for thread in threading.enumerate()
        if thread not in baseline and not thread.name.startswith("asyncio_")
    ]


@pytest.mark.slow
def test_resuming_many_times_leaves_no_thread_behind(service) -> None:
    """Every stream of a blocking session has a grpc thread that feeds it the session's
    requests; a stream that broke must let it go, or a chat that resumes every few minutes
    gathers thousands. Half the streams break in the middle of a reply, half while idle."""
    session = Session.open(service.address)
    try:
        session.reply(text="warm up", generate=SHORT)
        baseline = set(threading.enumerate())
        for attempt in range(RESUMES):
            with pytest.raises(StreamResumed) as cut:
                if attempt % 2 == 0:  # in a reply
                    for message in session.append(text="go on", generate=LONG):
                        if message.HasField("tokens"):
                            end_streams(service)
                    raise AssertionError("the reply ended: its stream was not cut")
                end_streams(service)  # idle: the next turn finds its stream gone
                until_detached(service, session.session_id)
                session.reply(text="next", generate=SHORT)
            assert cut.value.cause.code == grpc.StatusCode.UNAVAILABLE
        assert session.resumes == RESUMES
        assert len(session.reply(text="still here", generate=SHORT).ids) == 2
        deadline = time.monotonic() + 30  # a let-go thread returns soon after, not at once
        while len(left := client_threads(baseline)) > THREAD_SLACK:
            assert time.monotonic() < deadline, (
                f"{len(left)} threads more than before {RESUMES} resumes: {sorted(left)}"
            )
            time.sleep(0.05)
        print(f"{len(left)} client threads more after {RESUMES} resumes: {sorted(left)}")
    finally:
        with contextlib.suppress(SessionError):
            session.close()


@pytest.mark.slow
@pytest.mark.parametrize("resume", [True, False])
def test_a_send_on_a_stream_the_server_ended_says_so(service, resume: bool) -> None:
    """A send on a stream that has ended is not sent; the client says so (and resumes, if its
    policy does), as the asyncio client does, instead of dropping the message unseen."""
    session = Session.open(service.address, resume_policy=ResumePolicy() if resume else None)
    try:
        session.reply(text="hello", generate=SHORT)
        end_streams(service)
        until_detached(service, session.session_id)
        # The client hears of the end a moment after the replica lets go: Cancels (harmless
        # on an idle session) until a send says the stream is gone, with a hard cap.
        deadline = time.monotonic() + 20
        with pytest.raises(SessionError) as ended:
            while time.monotonic() < deadline:
                session.send(pb.ClientMessage(cancel=pb.Cancel()))
                time.sleep(0.01)
            raise AssertionError("20 s of sends on an ended stream, and none said so")
        assert isinstance(ended.value, StreamResumed) == resume
        if resume:
            assert ended.value.cause.code == grpc.StatusCode.UNAVAILABLE
            assert len(session.reply(text="again", generate=SHORT).ids) == 2
        else:
            assert ended.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        with contextlib.suppress(SessionError):
            session.close()


@pytest.mark.slow
def test_sinkserve_chat_goes_on_after_its_stream_breaks(service) -> None:
    """`sinkserve chat` is the client a person keeps open for days: a stream the service ends
    between turns (a drain, a replica restart) must not end the chat. The next message finds the
    stream gone, the client resumes, and since the service holds nothing of that message, the
    chat sends it again; the chat then leaves with the current resume token."""
    import re
    import subprocess
    import sys

    chat = subprocess.Popen(
        [sys.executable, "-m", "sinkserve.cli", "chat", "--target", service.address,
         "--max-new-tokens", "2", "--temperature", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        header = chat.stdout.readline()
        found = re.match(r"session (\S+) on replica", header)
        assert found, f"no session line from the chat: {header!r}"
        session_id = found.group(1)

        async def turns_ended() -> bool:
            entry = service.sessions.entries.get(session_id)
            return entry is not None and entry.inflight == 0 and entry.turn_ended_at is not None

        chat.stdin.write("hello\n")
        chat.stdin.flush()
        deadline = time.monotonic() + 60
        while not service.call(turns_ended()):
            assert chat.poll() is None, f"the chat ended: {chat.stderr.read()}"
            assert time.monotonic() < deadline, "the chat's first turn did not end in 60 s"
            time.sleep(0.05)
        end_streams(service)
        until_detached(service, session_id)
        out, err = chat.communicate("again\n", timeout=120)  # then end of input: Ctrl-D
    finally:
        if chat.poll() is None:
            chat.kill()
    assert chat.returncode == 0, f"the chat ended on the broken stream: {err.strip()}"
    assert "resumed, sending it again" in out, out
    assert f"session kept: --session {session_id} --resume-token " in out, out
