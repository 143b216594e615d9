"""The interface every session store backend implements, and the one error it raises."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from deployments.store.record import SessionRecord


class StoreUnavailableError(Exception):
    """The store could not be reached or did not answer in time; the caller may retry later."""


@dataclass(frozen=True)
class StoreUsage:
    """How big a store is: what `Stats` and the metrics show, to see it stays bounded."""

    live: int  # sessions not yet expired (what a resume can find)
    rows: int  # records held, expired ones not yet removed included
    bytes: int  # on disk (SQLite: the file and its WAL) or in memory (Redis: its keys)


@runtime_checkable
class SessionStore(Protocol):
    """Durable session records with fencing by epoch and expiry `ttl_s` after the last write.

    Every method raises `StoreUnavailableError` on a backend failure and nothing else.
    """

    ttl_s: float

    async def put_many(self, records: Sequence[SessionRecord]) -> list[str]:
        """Write a batch in one round trip; returns the ids refused because their epoch is stale."""
        ...

    async def get(self, session_id: str) -> SessionRecord | None: ...

    async def claim(self, session_id: str, replica_id: str) -> SessionRecord | None:
        """Take a session over: bump its epoch so its previous holder's writes are refused."""
        ...

    async def release(self, session_id: str, replica_id: str, epoch: int) -> bool:
        """Mark a session held by nobody, if `replica_id` still holds it at `epoch`."""
        ...

    async def delete(self, session_id: str) -> None: ...

    async def count(self) -> int:
        """Sessions the store holds now (not yet expired)."""
        ...

    async def usage(self) -> StoreUsage: ...

    async def expire_due(self, every_s: float) -> int | None:
        """Remove expired records unless some process of the service did within `every_s`: one
        sweep per period for the whole store, by whichever process asks first (nothing is held,
        so a process that dies leaves nothing to wait for). Returns how many were removed, or
        None when it was not this call's turn (or the backend expires records by itself)."""
        ...

    async def close(self) -> None: ...
