"""The interface every session store backend implements, and the one error it raises."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from deployments.store.record import SessionRecord


class StoreUnavailableError(Exception):
    """The store could not be reached or did not answer in time; the caller may retry later."""


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

    async def close(self) -> None: ...
