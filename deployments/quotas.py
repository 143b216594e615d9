"""Quotas per API key, and who owns which session.

- `max_sessions`: sessions a key may hold at once on the replicas (with a cache slot or offloaded
  there). Replicas know their sessions' owners and report counts by key; a gateway adds up every
  replica's report and the opens it placed since, and refuses an Open past the quota.
- `tokens_per_s`: a token bucket (`TokenBucket`, `burst_s` seconds of the rate deep) charged with
  every reply token and every appended input token of the key's streams. While it is empty the
  gateway paces the key's replies (it relays the next message once the bucket has refilled, and
  the replica's backpressure stops generating meanwhile) and holds its next append; an append that
  would wait longer than the bucket's depth is refused.

Both are RESOURCE_EXHAUSTED with a message that names the quota. Gateways of one application
share what each charged (through the directory, every half second), so a key's rate holds across
gateways within that lag.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc

from sinkwire.status import StreamError


@dataclass(frozen=True)
class Quota:
    max_sessions: int | None = None  # None: no limit
    tokens_per_s: float | None = None

    def describe(self) -> str:
        parts = []
        if self.max_sessions is not None:
            parts.append(f"max_sessions={self.max_sessions}")
        if self.tokens_per_s is not None:
            parts.append(f"tokens_per_s={self.tokens_per_s:g}")
        return " ".join(parts) or "none"


class TokenBucket:
    """`rate` tokens per second, at most `rate * burst_s` saved up; may go into debt."""

    def __init__(self, rate: float, burst_s: float) -> None:
        self.rate = rate
        self.capacity = rate * burst_s
        self.level = self.capacity
        self._at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now

    def charge(self, tokens: float) -> None:
        self._refill()
        self.level -= tokens

    def wait_s(self) -> float:
        """Seconds until the bucket is out of debt."""
        self._refill()
        return max(0.0, -self.level / self.rate)


class GatewayQuotas:
    """A gateway's view of every key's sessions and token rate."""

    def __init__(self, burst_s: float = 10.0) -> None:
        self.burst_s = burst_s
        self._sessions: dict[str, int] = {}  # by owner, from the replicas' last reports
        self._placed: Counter[str] = Counter()  # opens placed since those reports
        self._buckets: dict[str, TokenBucket] = {}
        self._charged: Counter[str] = Counter()  # own charges not yet shared with other gateways

    # -- sessions ------------------------------------------------------------------------------------
    def replicas_report(self, reports: Iterable[Mapping[str, int]]) -> None:
        """Every replica's sessions by owner (the directory's or the replicas' latest)."""
        total: Counter[str] = Counter()
        for report in reports:
            total.update(report)
        self._sessions = dict(total)
        self._placed.clear()

    def sessions(self, owner: str) -> int:
        return self._sessions.get(owner, 0) + self._placed[owner]

    def admit_open(self, owner: str, quota: Quota) -> None:
        """Count a new session for `owner`, or refuse it with RESOURCE_EXHAUSTED."""
        if quota.max_sessions is not None and self.sessions(owner) >= quota.max_sessions:
            raise StreamError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"API key {owner!r} is at its max_sessions quota ({quota.max_sessions} open); "
                "close a session or let one expire",
            )
        self._placed[owner] += 1

    # -- tokens --------------------------------------------------------------------------------------
    def bucket(self, owner: str, quota: Quota) -> TokenBucket | None:
        if quota.tokens_per_s is None:
            return None
        bucket = self._buckets.get(owner)
        if bucket is None or bucket.rate != quota.tokens_per_s:
            bucket = self._buckets[owner] = TokenBucket(quota.tokens_per_s, self.burst_s)
        return bucket

    def charge(self, owner: str, bucket: TokenBucket, tokens: int) -> None:
        bucket.charge(tokens)
        self._charged[owner] += tokens

    def take_charges(self) -> dict[str, int]:
        """What this gateway charged since the last call (to share with the other gateways)."""
        charged, self._charged = dict(self._charged), Counter()
        return charged

    def charge_others(self, charged: Mapping[str, int]) -> None:
        """Charges the other gateways made to keys this one has buckets for."""
        for owner, tokens in charged.items():
            if (bucket := self._buckets.get(owner)) is not None:
                bucket.charge(tokens)

    def admit_append(self, owner: str, quota: Quota, bucket: TokenBucket) -> float:
        """Seconds an append must wait for the bucket, or RESOURCE_EXHAUSTED past its depth."""
        wait = bucket.wait_s()
        if wait > self.burst_s:
            raise StreamError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"API key {owner!r} is over its tokens_per_s quota ({quota.tokens_per_s:g}/s); "
                f"retry in {wait:.0f} s",
            )
        return wait
