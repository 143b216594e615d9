"""StoreUpkeep: keeps a session store bounded over months, and says how big it is.

Sessions that nobody resumes (handed back to the store, or left by a replica that died) are owned
by no replica's sweep, so without this their rows would stay forever. Every replica runs one
StoreUpkeep; the store lets one sweep per period happen for the whole service (`expire_due`), so
replicas do not race, and a replica that dies leaves nothing held. Each also reads the store's size
for its metrics.
"""

from __future__ import annotations

import asyncio
import logging

from deployments.store.protocol import SessionStore, StoreUnavailableError, StoreUsage

logger = logging.getLogger(__name__)

MAX_SWEEP_PERIOD_S = 60.0
MIN_SWEEP_PERIOD_S = 0.5


def sweep_period_s(ttl_s: float) -> float:
    """How often the store is swept: a quarter of the TTL, between 0.5 s and 60 s, so an expired
    row lives at most that long past its TTL."""
    return min(MAX_SWEEP_PERIOD_S, max(MIN_SWEEP_PERIOD_S, ttl_s / 4))


class StoreUpkeep:
    """`run()` forever: the service's sweep when it is due, then the store's size in `usage`."""

    def __init__(self, store: SessionStore, period_s: float | None = None) -> None:
        self.store = store
        self.period_s = period_s if period_s is not None else sweep_period_s(store.ttl_s)
        self.usage: StoreUsage | None = None  # the newest reading (None before the first)
        self.sweeps = 0  # sweeps this process ran
        self.expired = 0  # rows they removed

    async def run(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(self.period_s)

    async def once(self) -> None:
        try:
            removed = await self.store.expire_due(self.period_s)
            if removed is not None:
                self.sweeps += 1
                self.expired += removed
                if removed:
                    logger.info("session store: %d expired sessions removed", removed)
            self.usage = await self.store.usage()
        except StoreUnavailableError as error:  # next period; reads ignore expired rows anyway
            logger.warning("session store upkeep failed: %s", error)
