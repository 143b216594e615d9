"""ReplicaDirectory: where each session replica listens and how full it is.

Replicas heartbeat here once a second; gateways read the list to route streams. An entry that
misses heartbeats for `REPLICA_STALE_AFTER_S` is dropped, so a dead replica leaves the list by itself.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ray import serve

from deployments.gateway_service import REPLICA_STALE_AFTER_S
from deployments.openai_sessions import LocalLedger


# Every replica calls `heartbeat` once a second and every gateway `replicas` twice: Serve's access
# log would be nearly all of the application's log lines.
# The HTTP door asks it about the ledger on every request: Serve's default of 5 calls in flight
# would queue them behind each other.
@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    logging_config={"enable_access_log": False},
    max_ongoing_requests=10_000,
)
class ReplicaDirectory:
    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, Any]] = {}
        # Token charges by key that each gateway has not yet heard of from the others.
        self._charges: dict[str, Counter[str]] = {}
        self._gateway_seen: dict[str, float] = {}
        # The HTTP API's latest response per session and sessions by chat key, for every gateway
        # (deployments/openai_sessions.py).
        self._ledger = LocalLedger()

    def heartbeat(self, info: dict[str, Any]) -> None:
        self._replicas[info["replica_id"]] = {**info, "seen": time.monotonic()}

    def leave(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def share_charges(self, gateway_id: str, charged: dict[str, int]) -> dict[str, int]:
        """A gateway's token charges since its last call; returns the others' since then."""
        now = time.monotonic()
        self._gateway_seen[gateway_id] = now
        for other, seen in list(self._gateway_seen.items()):
            if now - seen > REPLICA_STALE_AFTER_S:
                del self._gateway_seen[other]
                self._charges.pop(other, None)
        for other in self._gateway_seen:
            if other != gateway_id and charged:
                self._charges.setdefault(other, Counter()).update(charged)
        return dict(self._charges.pop(gateway_id, Counter()))

    def replicas(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        for replica_id, info in list(self._replicas.items()):
            if now - info["seen"] > REPLICA_STALE_AFTER_S:
                del self._replicas[replica_id]
        return [{k: v for k, v in info.items() if k != "seen"} for info in self._replicas.values()]

    def ledger_get(self, key: str) -> dict[str, Any] | None:
        return self._ledger.get_now(key)

    def ledger_put(self, key: str, value: dict[str, Any], ttl_s: float) -> None:
        self._ledger.put_now(key, value, ttl_s)
