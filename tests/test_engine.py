"""The engine end to end on a tiny random model: continuous batching, exact streams, errors."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from sinkcache.config import CacheGeometry
from sinkcache.core.arena import KVArena
from sinkcache.core.attention.backend import REFERENCE
from sinkcache.core.engine import EngineCore
from sinkcache.core.runner import ModelRunner
from sinkcache.errors import ArenaFullError, InvalidRequestError, SessionNotFoundError
from sinkcache.events import EndReason, TokensEvent, TurnEndEvent
from sinkcache.inputs import GenerationParams, TokenInput
from tests.streaming_reference import ReferenceStream
from tests.tiny_engine import SHAPE, collect, make_engine, tiny_models


@pytest.fixture(scope="module")
def models():
    return tiny_models()


async def test_greedy_replies_and_scores_follow_reference(models) -> None:
    hf, ours = models
    geometry = CacheGeometry(2, 10)
    engine = make_engine(ours, geometry)
    rng = random.Random(1)
    try:
        sessions = [(await engine.open_session()).session_id for _ in range(3)]
        refs = {s: ReferenceStream(hf, geometry.sink, geometry.window) for s in sessions}
        pending: dict[str, list[int]] = {s: [] for s in sessions}

        async def turn(session: str) -> None:
            prompt = [rng.randrange(SHAPE.vocab_size) for _ in range(rng.randint(1, 8))]
            params = GenerationParams(max_new_tokens=rng.randint(1, 25), temperature=0.0)
            stream = await engine.append(session, TokenInput(tuple(prompt)), params, score=True)
            ids, scores, end = await collect(stream)
            assert end.reason == EndReason.LENGTH and len(ids) == params.max_new_tokens
            # Check against the reference: same chunk, then one token at a time.
            ref = refs[session]
            fed = pending[session] + prompt
            logits = ref.feed(fed)
            logprobs = torch.log_softmax(logits, dim=-1)
            expect_scores = [logprobs[i, fed[i + 1]].item() for i in range(len(fed) - 1)]
            got_scores = [v for event in scores for v in event.logprobs]
            assert got_scores == pytest.approx(expect_scores, abs=1e-4)
            for i, token in enumerate(ids):
                assert logits[-1, token] >= logits[-1].max() - 1e-4, "not the greedy token"
                if i + 1 < len(ids):  # the last reply token stays pending
                    logits = ref.feed([token])
            pending[session] = [ids[-1]]

        for _ in range(6):  # several turns, the sessions' turns running concurrently
            await asyncio.gather(*(turn(s) for s in sessions))
    finally:
        await engine.shutdown()


async def test_held_tokens_equal_the_emitted_stream(models) -> None:
    """Random turns ending by EOS, length, cancel or no reply at all: whatever happens, the cache
    holds exactly the last tokens of what was appended plus what was emitted."""
    _, ours = models
    geometry = CacheGeometry(3, 9)
    eos = set(range(0, SHAPE.vocab_size, 4))  # a quarter of the vocab ends a reply
    engine = make_engine(ours, geometry, eos=eos)
    rng = random.Random(7)
    try:
        sessions = [(await engine.open_session()).session_id for _ in range(4)]
        streams: dict[str, list[int]] = {s: [] for s in sessions}
        reasons = set()

        async def turn(session: str) -> None:
            prompt = [rng.randrange(SHAPE.vocab_size) for _ in range(rng.randint(0, 14))]
            kind = rng.choice(["reply", "reply", "cancel", "append"])
            params = None
            if kind != "append":
                params = GenerationParams(max_new_tokens=rng.randint(1, 30), temperature=1.5)
                if not prompt:  # a reply after an EOS-ended reply needs input to continue from
                    prompt = [1]
            stream = await engine.append(session, TokenInput(tuple(prompt)), params)
            if kind == "cancel":
                await asyncio.sleep(rng.random() * 0.01)
                await engine.cancel(session)
            ids, _, end = await collect(stream)
            reasons.add(end.reason)
            streams[session] += prompt + ids
            assert end.stream_pos == len(streams[session])
            assert end.generated_tokens == len(ids)

        for _ in range(12):
            await asyncio.gather(*(turn(s) for s in sessions))
        for session in sessions:
            held = await engine.held_tokens(session)
            stream = streams[session]
            pending = len(engine.core.sessions[session].pending)  # 0 or 1: the last token
            cached = stream[: len(stream) - pending]
            tail = cached[: geometry.sink] + cached[geometry.sink :][-geometry.window :]
            assert held == tail + stream[len(cached) :]
            assert (await engine.session_info(session)).stream_pos == len(stream)
        assert {EndReason.EOS, EndReason.LENGTH, EndReason.APPENDED} <= reasons
    finally:
        await engine.shutdown()


async def test_long_append_does_not_stall_decoding(models) -> None:
    _, ours = models
    geometry = CacheGeometry(2, 8)
    engine = make_engine(ours, geometry, prefill_budget=12)
    try:
        a = (await engine.open_session()).session_id
        b = (await engine.open_session()).session_id
        params = GenerationParams(max_new_tokens=60, temperature=0.0)
        steps_before = engine.core.counters.steps
        reply = await engine.append(a, TokenInput((1, 2, 3)), params)
        first = await reply.__anext__()  # a is decoding now (a busy host may see 2+ tokens here)
        assert isinstance(first, TokensEvent)
        long_input = tuple(random.Random(0).randrange(SHAPE.vocab_size) for _ in range(200))
        appended = await engine.append(b, TokenInput(long_input))
        ids_a, _, end_a = await collect(reply)
        _, _, end_b = await collect(appended)
        assert end_a.reason == EndReason.LENGTH and end_b.reason == EndReason.APPENDED
        steps = engine.core.counters.steps - steps_before
        assert len(first.ids) + len(ids_a) == 60
        # a takes 60 steps (its prefill gives the first token, then 59 decodes); b's 199 tokens
        # need 25 chunks of at most the window: had the long append stalled a, the two would have
        # taken ~85 steps instead of sharing them.
        chunks = -(-199 // geometry.window)
        assert 60 <= steps < 60 + chunks // 2, steps
    finally:
        await engine.shutdown()


async def test_errors_leave_other_sessions_running(models) -> None:
    _, ours = models
    engine = make_engine(ours, CacheGeometry(2, 8), slots=2)
    try:
        a = (await engine.open_session()).session_id
        reply = await engine.append(
            a, TokenInput((5, 6)), GenerationParams(max_new_tokens=40, temperature=0.0)
        )
        await engine.open_session()
        with pytest.raises(ArenaFullError):
            await engine.open_session()
        with pytest.raises(SessionNotFoundError):
            await engine.append("nope", TokenInput((1,)))
        with pytest.raises(InvalidRequestError, match="out of range"):
            await engine.append(a, TokenInput((SHAPE.vocab_size,)))
        with pytest.raises(InvalidRequestError, match="top_p"):
            await engine.append(a, TokenInput((1,)), GenerationParams(top_p=0.0))
        with pytest.raises(InvalidRequestError, match="tokenizer"):
            from sinkcache.inputs import TextInput

            await engine.append(a, TextInput("hello"))
        ids, _, end = await collect(reply)
        assert end.reason == EndReason.LENGTH and len(ids) == 40
        await engine.close(a)
        await engine.open_session()  # the freed slot is usable again
    finally:
        await engine.shutdown()


async def test_no_cache_memory_after_startup(models) -> None:
    _, ours = models
    engine = make_engine(ours, CacheGeometry(2, 6), slots=3)
    arena = engine.core.arena
    tensors = {"k": arena.k, "v": arena.v, "seen": arena.seen, "next": arena.next_token}
    storage = {
        name: (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        for name, t in tensors.items()
    }
    try:
        sessions = [(await engine.open_session()).session_id for _ in range(3)]
        params = GenerationParams(max_new_tokens=800, temperature=1.0, ignore_eos=True)
        streams = [await engine.append(s, TokenInput((1, 2)), params) for s in sessions]
        results = await asyncio.gather(*(collect(s) for s in streams))
        assert all(len(ids) == 800 for ids, _, _ in results)
        for name, t in tensors.items():
            assert (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) == storage[name]
        assert arena.k is tensors["k"] and arena.v is tensors["v"]
    finally:
        await engine.shutdown()


async def test_seeded_sampling_is_independent_of_batching(models) -> None:
    """A seeded reply is the same alone and with three sessions decoding beside it at every one
    of its steps. The company is generating before the seeded turn starts and outlasts it (no end
    until cancelled), so each step's batch is the same on every run, however loaded the box: the
    batch's make-up changes float rounding, and the test must not depend on when steps ran."""
    _, ours = models
    params = GenerationParams(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9, seed=1234)
    endless = GenerationParams(max_new_tokens=100_000, temperature=1.0, seed=99, ignore_eos=True)
    outputs = []
    for company in (0, 3):  # alone, then sharing every step with three other sessions
        engine = make_engine(ours, CacheGeometry(2, 8))
        try:
            s = (await engine.open_session()).session_id
            others = [(await engine.open_session()).session_id for _ in range(company)]
            side = [await engine.append(o, TokenInput((3, 4, 5)), endless) for o in others]
            for stream in side:  # each one past its prefill and decoding
                async with asyncio.timeout(60):
                    while not isinstance(await anext(stream), TokensEvent):
                        pass
            ids, _, end = await collect(await engine.append(s, TokenInput((7, 8, 9)), params))
            assert end.reason == EndReason.LENGTH and len(ids) == 30
            for other, stream in zip(others, side, strict=True):
                assert await engine.cancel(other), "a companion ended before the seeded turn"
                await collect(stream)
            outputs.append(ids)
        finally:
            await engine.shutdown()
    assert outputs[0] == outputs[1]


async def test_text_chat_and_stop_strings_with_a_tokenizer() -> None:
    """Text appends, chat turns and stop strings, on the tiny model with the default tokenizer."""
    from sinkcache.config import EngineConfig
    from sinkcache.host.builder import build_engine
    from sinkcache.inputs import ChatTurn, TextInput

    engine = build_engine(
        EngineConfig(model="tiny", sink=4, window=60, slots=4, flush_interval_s=0.0)
    )
    engine.start()
    try:
        session = (await engine.open_session()).session_id
        greedy = GenerationParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
        ids, _, end = await collect(await engine.append(session, ChatTurn("user", "hi"), greedy))
        assert end.reason == EndReason.LENGTH and len(ids) == 40
        codec = engine.core.intake.codec
        full = codec.decode(ids)
        stop = full[10:13]  # a piece of what greedy decoding says next, from the same state
        other = (await engine.open_session()).session_id
        params = GenerationParams(max_new_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,))
        stream = await engine.append(other, ChatTurn("user", "hi"), params)
        text, end = "", None
        async for event in stream:
            if isinstance(event, TokensEvent):
                text += event.text
            elif isinstance(event, TurnEndEvent):
                end = event
        assert end.reason == EndReason.STOP and end.detail == stop
        assert stop in text and len(text) < len(full)
        assert full.startswith(text)  # the same greedy reply, cut at the stop string
        _, scores, end = await collect(
            await engine.append(session, TextInput(" and so on"), score=True)
        )
        assert end.reason == EndReason.APPENDED and all(s.logprobs for s in scores)
    finally:
        await engine.shutdown()


def test_warm_up_leaves_nothing_behind(models) -> None:
    _, model = models
    arena = KVArena(model.shape, CacheGeometry(4, 28), 3, torch.float32, "cpu")
    core = EngineCore(ModelRunner(model, arena, REFERENCE), None, 64)
    core.warm_up()
    assert not core.sessions and arena.free_slots == 3 and not core.busy
    assert core.counters.steps == 0 and core.counters.generated_tokens == 0
    assert not core.take_dirty() and core.runner.capture_graphs() == 0  # no graphs on CPU
