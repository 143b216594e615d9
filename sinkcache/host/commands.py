"""Commands to an engine, as data: frozen dataclasses that pickle as they are across the engine
process's socket. What each one does is `sinkcache.host.loop.LoopCommands`, once for every host.
Torch-free."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sinkcache.events import SessionSnapshot
from sinkcache.inputs import AppendInput, GenerationParams


@dataclass(frozen=True)
class OpenSession:
    session_id: str | None = None
    stream_base: int = 0


@dataclass(frozen=True)
class GetSessionInfo:
    session_id: str
    settled: bool = False  # answer once the session's running and queued requests are done


@dataclass(frozen=True)
class Submit:
    request_id: int  # names the request's events in later batches
    session_id: str
    item: AppendInput
    generation: GenerationParams | None
    score: bool
    max_chunk: int | None


@dataclass(frozen=True)
class CancelReply:
    session_id: str


@dataclass(frozen=True)
class HoldDecode:
    session_id: str
    held: bool  # True: no decode rows until released (its reader is behind)


@dataclass(frozen=True)
class CloseSession:
    session_id: str


@dataclass(frozen=True)
class GetHeldTokens:
    session_id: str


@dataclass(frozen=True)
class RestoreSession:
    session_id: str
    tokens: bytes  # a SessionSnapshot's ids (array('i') bytes)
    stream_pos: int
    open_reply: int | None


@dataclass(frozen=True)
class OffloadSession:
    session_id: str


@dataclass(frozen=True)
class WatchSnapshots:
    pass


@dataclass(frozen=True)
class GetStats:
    pass


@dataclass(frozen=True)
class TakeStepSeconds:
    pass


Command = (
    OpenSession
    | GetSessionInfo
    | Submit
    | CancelReply
    | HoldDecode
    | CloseSession
    | GetHeldTokens
    | RestoreSession
    | OffloadSession
    | WatchSnapshots
    | GetStats
    | TakeStepSeconds
)
Reply = Callable[[bool, Any], None]  # (ok, value) or (False, error)
EventBatch = list[tuple[int, list[Any]]]  # (request id, its new events) per request
# What one flush of the engine loop delivers: request events, and session snapshots (if watched).
Delivery = tuple[EventBatch, list[SessionSnapshot]]
