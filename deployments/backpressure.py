"""Backpressure: a stream's reply messages waiting for a slow client are bounded.

A replica yields a stream's messages to gRPC, which sends them as the client's HTTP/2 flow-control
window allows; a client that stops reading stops taking them, and they wait in the stream's
ReplyBuffer. Past `high` tokens waiting (reply tokens and scores; every message counts at least
one), the buffer asks the engine to hold the session's decoding (no decode rows: nothing more is
generated, and nobody else waits for it), and once the client has read it down to `high / 2` it
releases it. So what an unread reply costs is bounded per stream: this buffer, the flow-control
windows of the two hops, and a step or two of tokens in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sinkcache.errors import EngineError

log = logging.getLogger(__name__)


def weight(item: Any) -> int:
    """What a queued item costs the reader: its tokens and scores, at least 1 per message."""
    tokens = getattr(item, "tokens", None)
    scores = getattr(item, "scores", None)
    count = len(tokens.ids) if tokens is not None else 0
    count += len(scores.logprobs) if scores is not None else 0
    return max(1, count)


class ReplyBuffer(asyncio.Queue):
    """A stream's outgoing queue that holds its session's decoding while it is too full."""

    def __init__(self, high: int) -> None:
        super().__init__()
        self.high = max(1, high)
        self.low = self.high // 2
        self.tokens = 0
        self.held = False
        self._hold: Callable[[bool], Awaitable[None]] | None = None
        self._pending: set[asyncio.Task] = set()

    def watch(self, hold: Callable[[bool], Awaitable[None]]) -> None:
        """Call `hold(True)` when the buffer passes `high`, `hold(False)` when it is read down."""
        self._hold = hold

    def release(self) -> None:
        """The stream is ending: release a hold it still has."""
        if self.held:
            self._set(False)
        self._hold = None

    # asyncio.Queue's hooks for subclasses (as PriorityQueue uses them)
    def _put(self, item: Any) -> None:
        super()._put(item)
        self.tokens += weight(item)
        if not self.held and self.tokens > self.high:
            self._set(True)

    def _get(self) -> Any:
        item = super()._get()
        self.tokens -= weight(item)
        if self.held and self.tokens <= self.low:
            self._set(False)
        return item

    def _set(self, held: bool) -> None:
        self.held = held
        if self._hold is None:
            return
        # Tasks start in creation order, so the engine gets hold/release commands in order.
        task = asyncio.get_running_loop().create_task(self._call(self._hold, held))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    @staticmethod
    async def _call(hold: Callable[[bool], Awaitable[None]], held: bool) -> None:
        with contextlib.suppress(EngineError):  # the session closed meanwhile: nothing to hold
            await hold(held)
