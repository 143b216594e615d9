"""ThreadEngine: the engine loop on a thread of this process.

For tests, evaluation and debugging (one process to profile), and for servers with
`engine_process=false`. The thread owns the EngineCore and every device tensor; the event loop's
thread only moves commands in and replies and event batches out.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

from sinkcache.core.engine import EngineCore
from sinkcache.errors import EngineStoppedError
from sinkcache.events import SessionSnapshot
from sinkcache.host.client import EngineClient
from sinkcache.host.commands import Command
from sinkcache.host.loop import EngineLoop, LoopCommands, Outbox, take_events


class ThreadEngine(EngineClient):
    """An EngineCore stepped on its own thread, reached through the asyncio `Engine` API."""

    def __init__(
        self, core: EngineCore, flush_interval: float = 0.005, max_events_per_s: float = 5000.0
    ) -> None:
        super().__init__()
        self.core = core
        self.commands = LoopCommands(core)
        self.loop = EngineLoop(core, self._deliver, flush_interval, max_events_per_s)
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sinkcache-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self.loop.stop()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # -- engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        self.loop.run()
        if self.loop.error is not None:
            error = EngineStoppedError(f"engine failed: {self.loop.error}")
            self._to_event_loop(self._on_lost, error)

    def _deliver(self, outboxes: set[Outbox], snapshots: list[SessionSnapshot]) -> None:
        self._to_event_loop(self._on_events, take_events(outboxes), snapshots)

    def _answer(self, call_id: int, ok: bool, value: Any) -> None:
        self._to_event_loop(self._on_reply, call_id, ok, value)

    def _to_event_loop(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    # -- event loop thread ---------------------------------------------------------------------------
    def _send(self, call_id: int, command: Command) -> None:
        reply = functools.partial(self._answer, call_id)
        self.loop.post(functools.partial(self.commands.run, command, reply))
