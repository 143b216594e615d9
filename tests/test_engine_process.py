"""ProcessEngine: the engine in a child process behaves as the in-thread ThreadEngine does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sinkcache.config import EngineConfig
from sinkcache.errors import (
    ArenaFullError,
    EngineStoppedError,
    InvalidRequestError,
    SessionNotFoundError,
)
from sinkcache.events import EndReason, ScoresEvent, TokensEvent, TurnEndEvent
from sinkcache.host.builder import build_engine
from sinkcache.host.process import ProcessEngine
from sinkcache.inputs import ChatTurn, GenerationParams, TokenInput

CONFIG = EngineConfig(model="tiny", sink=4, window=60, slots=6, flush_interval_s=0.0)
SAMPLED = GenerationParams(max_new_tokens=150, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)


async def collect(stream) -> tuple[list[int], str, list[ScoresEvent], TurnEndEvent]:
    ids, text, scores, end = [], [], [], None
    async for event in stream:
        if isinstance(event, TokensEvent):
            ids += event.ids
            text.append(event.text)
        elif isinstance(event, ScoresEvent):
            scores.append(event)
        elif isinstance(event, TurnEndEvent):
            end = event
    return ids, "".join(text), scores, end


async def conversation(engine) -> list:
    """Three sessions, two sampled turns each (the second past the cache's capacity), then a
    scored append, the settled position and the held tokens."""

    async def one(i: int) -> list:
        session = (await engine.open_session()).session_id
        out = []
        for turn in range(2):
            stream = await engine.append(session, ChatTurn("user", f"hello {i} {turn}"), SAMPLED)
            out.append(await collect(stream))
        stream = await engine.append(session, TokenInput(list(range(5, 40))), None, score=True)
        out.append(await collect(stream))
        info = await engine.session_info(session, settled=True)
        out.append((info.stream_pos, await engine.held_tokens(session)))
        return out

    # One session at a time: a row's logits may differ in the last bit with batch company, which
    # can flip a sampled token; alone, both engines run the same steps.
    return [await one(i) for i in range(3)]


async def test_same_streams_as_the_in_thread_engine() -> None:
    engine = await ProcessEngine.launch(CONFIG)
    try:
        assert engine.pid != os.getpid()
        served = await conversation(engine)
    finally:
        await engine.shutdown()
    local = build_engine(CONFIG)
    local.start()
    try:
        expected = await conversation(local)
    finally:
        await local.shutdown()
    assert served == expected
    first_reply = served[0][0]
    assert len(first_reply[0]) == 150 and first_reply[1] and first_reply[3].reason == "length"
    assert served[0][2][2] and served[0][2][3].reason == EndReason.APPENDED  # scores came through
    assert engine._process.returncode == 0


async def test_errors_cancel_close_and_stats() -> None:
    engine = await ProcessEngine.launch(CONFIG)
    try:
        session = (await engine.open_session()).session_id
        with pytest.raises(InvalidRequestError, match="out of range"):
            await engine.append(session, TokenInput([10**6]), None)
        with pytest.raises(SessionNotFoundError):
            await engine.append("nope", TokenInput([1]), None)
        with pytest.raises(InvalidRequestError, match="top_p"):
            await engine.append(session, TokenInput([1]), GenerationParams(top_p=0.0))
        endless = GenerationParams(max_new_tokens=10**6, ignore_eos=True, temperature=0.0)
        stream = await engine.append(session, TokenInput([1, 2, 3]), endless)
        first = await anext(stream)
        assert isinstance(first, TokensEvent)
        assert await engine.cancel(session)
        ids, _, _, end = await collect(stream)
        assert end.reason == EndReason.CANCELLED
        stats = await engine.stats()
        assert stats.sessions == 1 and stats.device == "cpu"
        assert stats.generated_tokens == len(first.ids) + len(ids)
        assert stats.engine_rss_bytes > 10 * 2**20
        assert await engine.take_step_seconds() and not await engine.take_step_seconds()
        os.kill(engine.pid, signal.SIGSTOP)  # a long step: stats answer anyway, from the last
        try:
            started = time.monotonic()
            assert await engine.stats() == stats
            assert time.monotonic() - started < 2
        finally:
            os.kill(engine.pid, signal.SIGCONT)
        await engine.close(session)
        with pytest.raises(SessionNotFoundError):
            await engine.session_info(session)
        for _ in range(CONFIG.slots):
            await engine.open_session()
        with pytest.raises(ArenaFullError):  # the error's own type, so it maps to its own status
            await engine.open_session()
    finally:
        await engine.shutdown()


async def test_a_dead_engine_process_fails_what_waits_on_it() -> None:
    engine = await ProcessEngine.launch(CONFIG)
    try:
        session = (await engine.open_session()).session_id
        endless = GenerationParams(max_new_tokens=10**6, ignore_eos=True, temperature=0.0)
        stream = await engine.append(session, TokenInput([1, 2, 3]), endless)
        await anext(stream)
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineStoppedError):
            async for _ in stream:
                pass
        assert engine.error is not None
        with pytest.raises(EngineStoppedError):
            await engine.open_session()
    finally:
        await engine.shutdown()


async def test_a_bad_config_fails_the_launch_with_the_reason() -> None:
    bad = EngineConfig(model="no-such-model", slots=2)
    with pytest.raises(EngineStoppedError, match=r"could not start.*no-such-model"):
        await ProcessEngine.launch(bad)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_an_engine_process_dies_with_its_parent_even_while_it_starts() -> None:
    """A replica SIGKILLed while its engine child is still being built: the child is killed
    with it at once. Before, the child built the engine to the end (the CPU, or on a GPU the
    memory its replacement needs) and only then died on the closed socket, with a traceback."""
    import psutil

    launch = (
        "import asyncio\n"
        "from sinkcache.config import EngineConfig\n"
        "from sinkcache.host.process import ProcessEngine\n"
        "asyncio.run(ProcessEngine.launch(EngineConfig(model='tiny', sink=4, window=60, slots=6)))"
    )
    root = Path(__file__).resolve().parent.parent
    parent = subprocess.Popen(
        [sys.executable, "-c", launch], stderr=subprocess.PIPE, text=True, cwd=root
    )
    deadline = time.monotonic() + 60
    while not (children := psutil.Process(parent.pid).children()):
        assert time.monotonic() < deadline and parent.poll() is None, "no engine process"
        time.sleep(0.05)
    time.sleep(0.5)  # into its start (imports, model build)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_running(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(child) for child in children), "the engine outlived its parent"
    errors = parent.stderr.read()  # ends once the child, which shares the pipe, is gone
    assert "Traceback" not in errors, errors


def _running(process) -> bool:
    """Alive and not a zombie (an orphan's exit waits for init to collect it)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
