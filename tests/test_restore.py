"""Sessions rebuilt from their snapshots: exactly the recomputation oracle, positions continuous."""

from __future__ import annotations

from array import array

import pytest
import torch

from sinkcache.config import CacheGeometry
from sinkcache.errors import InvalidRequestError
from sinkcache.events import EndReason, SessionSnapshot
from sinkcache.inputs import GenerationParams, TokenInput
from tests.tiny_engine import collect, make_engine, tiny_models

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def _ids(snapshot: SessionSnapshot) -> list[int]:
    ids = array("i")
    ids.frombytes(snapshot.tokens)
    return ids.tolist()


async def test_a_rebuilt_session_continues_exactly_as_a_fresh_one_fed_its_held_ids(models) -> None:
    """The rebuild exactness test: after a rebuild, greedy continuation and the scores of appended
    tokens equal those of a fresh engine fed the same held ids (float32, within 1e-4), and the
    stream position continues where the snapshot left it."""
    _, ours = models
    geometry = CacheGeometry(2, 10)
    source, rebuilt, fresh = (make_engine(ours, geometry) for _ in range(3))
    try:
        await source.watch_snapshots(lambda _: None)
        session = (await source.open_session()).session_id
        generator = torch.Generator().manual_seed(7)
        prompt = torch.randint(0, 61, (37,), generator=generator).tolist()
        await collect(await source.append(session, TokenInput(tuple(prompt)), GREEDY))
        await collect(await source.append(session, TokenInput((5, 6, 7)), None))
        info = await source.session_info(session, settled=True)
        snapshot = await source.offload_session(session)
        assert snapshot.stream_pos == info.stream_pos == 37 + 12 + 3
        held = _ids(snapshot)
        assert len(held) == geometry.capacity + 1  # the window was wrapped: sinks + W + pending
        with pytest.raises(Exception, match="not found"):
            await source.session_info(session)  # offloaded: its slot is free

        restored = await rebuilt.restore_session(snapshot)
        assert restored.stream_pos == snapshot.stream_pos
        probe = TokenInput((9, 8, 7, 6))
        ids_a, scores_a, end_a = await collect(
            await rebuilt.append(session, probe, GREEDY, score=True)
        )
        assert end_a.stream_pos == snapshot.stream_pos + 4 + 12

        oracle = (await fresh.open_session()).session_id
        await collect(await fresh.append(oracle, TokenInput(tuple(held)), None))
        ids_b, scores_b, end_b = await collect(
            await fresh.append(oracle, probe, GREEDY, score=True)
        )
        assert ids_a == ids_b
        got = [v for event in scores_a for v in event.logprobs]
        want = [v for event in scores_b for v in event.logprobs]
        assert got == pytest.approx(want, abs=1e-4)
        assert end_a.reason == end_b.reason == EndReason.LENGTH
    finally:
        for engine in (source, rebuilt, fresh):
            await engine.shutdown()


async def test_snapshots_come_at_turn_ends_and_during_long_replies(models) -> None:
    _, ours = models
    geometry = CacheGeometry(2, 8)  # a snapshot every 4 reply tokens
    engine = make_engine(ours, geometry)
    seen: list[SessionSnapshot] = []
    try:
        await engine.watch_snapshots(seen.extend)
        session = (await engine.open_session()).session_id
        params = GenerationParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
        ids, _, end = await collect(await engine.append(session, TokenInput((1, 2, 3)), params))
        await engine.session_info(session, settled=True)
        mine = [s for s in seen if s.session_id == session]
        assert mine, "no snapshot"
        last = mine[-1]
        assert last.stream_pos == end.stream_pos == 3 + 20
        stream = [1, 2, 3, *ids]
        # A reply cut by length: its last token was produced, not yet written, so it is pending.
        assert _ids(last) == stream[:2] + stream[-9:]
        # Every snapshot is a prefix of the stream as it then stood (sinks + tail + pending).
        for snapshot in mine:
            upto = stream[: snapshot.stream_pos]
            expect = upto if len(upto) <= 11 else upto[:2] + upto[-9:]
            assert _ids(snapshot) == expect
    finally:
        await engine.shutdown()


async def test_busy_sessions_are_not_offloaded_and_bad_snapshots_are_refused(models) -> None:
    _, ours = models
    engine = make_engine(ours, CacheGeometry(2, 8))
    try:
        session = (await engine.open_session()).session_id
        params = GenerationParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
        stream = await engine.append(session, TokenInput((1, 2)), params)
        with pytest.raises(InvalidRequestError, match="busy"):
            await engine.offload_session(session)
        await engine.cancel(session)
        await collect(stream)
        too_many = array("i", range(12)).tobytes()
        with pytest.raises(InvalidRequestError):
            await engine.restore_session(SessionSnapshot("x", too_many, 50, None))
        with pytest.raises(InvalidRequestError):
            await engine.restore_session(SessionSnapshot("y", too_many[:8], 1, None))
    finally:
        await engine.shutdown()
