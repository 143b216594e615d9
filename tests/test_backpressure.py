"""Backpressure in the engine: a held session gets no decode rows, keeps its place, and goes on
exactly where it stopped; cancel and close still end a held reply; nobody else waits for it.
(The service-level check, a client that stops reading, is in tests/test_defects.py.)"""

from __future__ import annotations

import pytest

from sinkcache.config import EngineConfig
from sinkcache.core.engine import EngineCore
from sinkcache.events import EndReason, TokensEvent, TurnEndEvent
from sinkcache.host.builder import build_core
from sinkcache.inputs import GenerationParams, TokenInput

PROMPT = TokenInput((5, 6, 7, 8))
GREEDY = GenerationParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)


class Sink:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.end: TurnEndEvent | None = None

    def push(self, event) -> None:
        if isinstance(event, TokensEvent):
            self.ids += event.ids
        elif isinstance(event, TurnEndEvent):
            self.end = event

    def fail(self, error: BaseException) -> None:
        raise AssertionError(f"request failed: {error}")


@pytest.fixture(scope="module")
def core() -> EngineCore:
    return build_core(EngineConfig(model="tiny", slots=4, window=60, torch_threads=1))


def steps(core: EngineCore, count: int) -> None:
    for _ in range(count):
        core.step()
    core.take_dirty()  # pending reply tokens become events


def run_to_idle(core: EngineCore, limit: int = 1000) -> None:
    for _ in range(limit):
        if not core.step() and not core.busy:
            core.take_dirty()
            return
    raise AssertionError("the engine did not go idle")


def reply(core: EngineCore, session_id: str, params: GenerationParams = GREEDY) -> Sink:
    sink = Sink()
    core.submit(session_id, PROMPT, params, False, sink)
    return sink


def test_a_held_reply_stops_and_goes_on_exactly_where_it_stopped(core) -> None:
    core.open_session("reference")
    expected = reply(core, "reference")
    run_to_idle(core)
    core.close("reference")

    core.open_session("held")
    sink = reply(core, "held")
    steps(core, 8)
    core.hold_decode("held", True)
    steps(core, 3)  # what was in flight lands
    made = len(sink.ids)
    assert 0 < made < GREEDY.max_new_tokens
    steps(core, 20)
    assert len(sink.ids) == made and sink.end is None  # held: nothing more
    assert core.scheduler.held and not core.scheduler.decoding
    assert not core.busy  # a held session is no work: the loop may sleep

    other = "other"
    core.open_session(other)
    other_sink = reply(core, other)  # nobody waits for the held one
    run_to_idle(core)
    assert other_sink.end.reason == EndReason.LENGTH and len(sink.ids) == made

    core.hold_decode("held", False)
    run_to_idle(core)
    assert sink.end.reason == EndReason.LENGTH
    assert sink.ids == expected.ids  # greedy output unchanged by the pause
    core.close("held")
    core.close(other)


def test_a_hold_lasts_across_turns_and_cancel_and_close_still_end_it(core) -> None:
    core.open_session("s")
    core.hold_decode("s", True)  # held before its turn: prefill runs, decoding waits
    sink = reply(core, "s")
    steps(core, 10)
    assert len(sink.ids) <= 1 and sink.end is None
    core.cancel("s")
    run_to_idle(core)
    assert sink.end.reason == EndReason.CANCELLED

    second = reply(core, "s")  # still held: the next turn waits as well
    steps(core, 10)
    assert second.end is None and len(second.ids) <= 1
    free = core.arena.free_slots
    core.close("s")
    run_to_idle(core)
    assert second.end.reason == EndReason.CANCELLED  # as a reply closed while it runs
    assert core.arena.free_slots == free + 1 and "s" not in core.sessions
    assert not core.scheduler.held
