"""EngineLoop: the one loop that steps an EngineCore, whoever hosts it.

It runs queued commands, steps, and now and then hands the sinks with new events to `deliver`.
AsyncEngine runs it on a thread and delivers by waking asyncio streams; the engine process
(sinkcache.engine_process) runs it on its main thread and delivers by writing one message to its
parent. Only the loop's thread touches the core.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sinkcache.engine import EngineCore
from sinkcache.session import EngineStoppedError, Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    slot: int
    capacity: int
    sink: int
    window: int
    stream_pos: int


def session_info(core: EngineCore, session: Session) -> SessionInfo:
    geometry = core.arena.geometry
    return SessionInfo(
        session.session_id,
        session.slot,
        geometry.capacity,
        geometry.sink,
        geometry.window,
        session.stream_pos,
    )


def engine_stats(core: EngineCore) -> dict[str, Any]:
    """A snapshot for metrics and the Stats RPC (counters only: safe to read from any thread)."""
    arena = core.arena
    recent = list(core.counters.step_seconds)[-256:]
    return {
        "sessions": len(core.sessions),
        "slots_total": arena.num_slots,
        "slots_used": arena.used_slots,
        "slots_free": arena.free_slots,
        "decoding": len(core.scheduler.decoding),
        "prefill_queue": len(core.scheduler.prefilling),
        "steps": core.counters.steps,
        "decode_tokens": core.counters.decode_tokens,
        "prefill_tokens": core.counters.prefill_tokens,
        "generated_tokens": core.counters.generated_tokens,
        "turns_finished": core.counters.turns_finished,
        "step_ms_p50": 1000 * sorted(recent)[len(recent) // 2] if recent else 0.0,
        "kv_bytes": arena.nbytes(),
        "device": str(arena.device),
    }


class EngineLoop:
    """Steps the core until stopped; commands are closures run between steps."""

    def __init__(
        self,
        core: EngineCore,
        deliver: Callable[[set[Any]], None],
        flush_interval: float = 0.005,
        max_events_per_s: float = 5000.0,
    ) -> None:
        self.core = core
        self.deliver = deliver
        self.flush_interval = flush_interval
        # Under load, flush less often so the events sent per second stay near this rate: each
        # event is a message to a client, and Python pays per message, not per token.
        self.max_events_per_s = max_events_per_s
        self.commands: deque[Callable[[], None]] = deque()
        self.wakeup = threading.Event()
        self.stopping = False
        self.error: BaseException | None = None
        self._last_flush = 0.0

    def post(self, command: Callable[[], None]) -> None:
        """Run `command` on the loop's thread before its next step (callable from any thread)."""
        self.commands.append(command)
        self.wakeup.set()

    def stop(self) -> None:
        self.stopping = True
        self.wakeup.set()

    def run(self) -> None:
        core = self.core
        try:
            while not self.stopping:
                while self.commands:
                    self.commands.popleft()()
                worked = core.step()
                pending = core.pending_sinks
                if pending:
                    now = time.perf_counter()
                    interval = max(self.flush_interval, pending / self.max_events_per_s)
                    if not worked or now - self._last_flush >= interval:
                        self._flush(now)
                if not worked and not core.busy and not self.commands:
                    self.wakeup.wait(timeout=0.05)
                    self.wakeup.clear()
            core.drain()
        except BaseException as error:
            log.exception("engine loop failed")
            self.error = error
            for session in list(core.sessions.values()):
                for request in ([session.active] if session.active else []) + list(session.queue):
                    request.sink.fail(EngineStoppedError(f"engine failed: {error}"))
                    core.dirty.add(request.sink)
        finally:
            self._flush(time.perf_counter())
            while self.commands:  # answer whoever is still waiting
                self.commands.popleft()()

    def _flush(self, now: float) -> None:
        self._last_flush = now
        sinks = self.core.take_dirty()
        if sinks:
            self.deliver(sinks)
