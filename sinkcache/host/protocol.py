"""The engine as its callers see it: one Protocol, plain records, whatever hosts the loop.

Torch-free: the replica's gRPC process talks to an engine in another process through this.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from sinkcache.events import Event, SessionSnapshot
from sinkcache.inputs import AppendInput, GenerationParams


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    slot: int
    capacity: int
    sink: int
    window: int
    stream_pos: int


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics, health and the Stats RPC."""

    sessions: int
    slots_total: int
    slots_used: int
    slots_free: int
    decoding: int  # sessions generating
    prefill_queue: int  # sessions with input waiting to be written
    steps: int
    decode_tokens: int
    prefill_tokens: int
    generated_tokens: int
    turns_finished: int
    step_ms_p50: float  # over the last 256 steps
    kv_bytes: int
    device: str
    engine_rss_bytes: int  # the engine's own process; 0 when it shares the caller's
    engine_pid: int  # the engine's own process; 0 when it shares the caller's
    decode_held: int = 0  # generating sessions held for a slow reader (backpressure)


class Engine(Protocol):
    """What a server needs of an engine. Errors are sinkcache.errors classes."""

    @property
    def error(self) -> BaseException | None:
        """Why the engine stopped serving, if it did."""
        ...

    async def open_session(
        self, session_id: str | None = None, stream_base: int = 0
    ) -> SessionInfo: ...

    async def session_info(self, session_id: str, settled: bool = False) -> SessionInfo:
        """`settled` waits until the session's running and queued requests are done."""
        ...

    async def append(
        self,
        session_id: str,
        item: AppendInput,
        generation: GenerationParams | None = None,
        score: bool = False,
        max_chunk: int | None = None,
    ) -> AsyncIterator[Event]:
        """Queue an append; validation errors raise here, before anything is queued."""
        ...

    async def cancel(self, session_id: str) -> bool: ...

    async def hold_decode(self, session_id: str, held: bool) -> None:
        """Stop (True) or restart (False) the session's generating: its reader is behind."""
        ...

    async def close(self, session_id: str) -> None: ...

    async def held_tokens(self, session_id: str) -> list[int]: ...

    async def restore_session(self, snapshot: SessionSnapshot) -> SessionInfo:
        """Rebuild a session from its snapshot, in a free slot."""
        ...

    async def offload_session(self, session_id: str) -> SessionSnapshot:
        """Take an idle session off the device; its snapshot rebuilds it later."""
        ...

    async def watch_snapshots(self, callback: Callable[[list[SessionSnapshot]], None]) -> None:
        """Have `callback` receive session snapshots (turn ends, long replies) once per flush."""
        ...

    async def stats(self) -> EngineStats: ...

    async def take_step_seconds(self) -> list[float]:
        """Step durations recorded since the last call (at most the last 4096)."""
        ...

    async def shutdown(self) -> None: ...
