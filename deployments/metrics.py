"""Prometheus metrics of a replica, through Ray's metrics API (exported by every Ray node).

Counters and gauges are refreshed from the engine's counters once a second, so the hot path pays
nothing for them. Names are prefixed `sinkserve_` (Ray adds `ray_`).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from deployments.store import StoreUsage
from sinkcache.host.protocol import EngineStats

STEP_MS_BOUNDARIES = [0.5, 1, 2, 3, 5, 8, 12, 20, 35, 50, 80, 120, 200, 350, 500, 1000]


class ReplicaMetrics:
    def __init__(self, replica_id: str) -> None:
        self.tags = {"replica": replica_id}
        keys = ("replica",)
        self.sessions = Gauge(
            "sinkserve_sessions", "sessions with a cache slot (resident)", tag_keys=keys
        )
        self.offloaded = Gauge(
            "sinkserve_sessions_offloaded",
            "sessions held off the GPU (rebuilt on their next message)",
            tag_keys=keys,
        )
        self.checkpoint_failures = Counter(
            "sinkserve_checkpoint_failures",
            "session-store writes that failed (they are retried)",
            tag_keys=keys,
        )
        self.slots_free = Gauge("sinkserve_slots_free", "free cache slots", tag_keys=keys)
        self.decoding = Gauge("sinkserve_decoding_sessions", "sessions generating", tag_keys=keys)
        self.queue_depth = Gauge(
            "sinkserve_prefill_queue", "sessions with input waiting to be prefilled", tag_keys=keys
        )
        self.kv_bytes = Gauge("sinkserve_kv_bytes", "bytes of the KV arena", tag_keys=keys)
        self.generated = Counter(
            "sinkserve_generated_tokens", "tokens generated (rate() is tokens/s)", tag_keys=keys
        )
        self.decode_tokens = Counter("sinkserve_decode_tokens", "tokens decoded", tag_keys=keys)
        self.prefill_tokens = Counter("sinkserve_prefill_tokens", "tokens prefilled", tag_keys=keys)
        self.turns = Counter("sinkserve_turns", "appends finished", tag_keys=keys)
        self.step_ms = Histogram(
            "sinkserve_step_ms", "engine step latency (ms)", STEP_MS_BOUNDARIES, tag_keys=keys
        )
        self.store_rows = Gauge(
            "sinkserve_store_rows",
            "records in the session store, expired ones not yet swept included (the store is "
            "shared: every replica reports the same)",
            tag_keys=keys,
        )
        self.store_bytes = Gauge(
            "sinkserve_store_bytes",
            "the session store's size: SQLite file and WAL, or Redis keys' memory",
            tag_keys=keys,
        )
        self._last: dict[str, int] = {}

    def record(
        self,
        stats: EngineStats,
        new_step_seconds: list[float] = (),
        offloaded: int = 0,
        checkpoint_failures: int = 0,
        store_usage: StoreUsage | None = None,
    ) -> None:
        """Refresh from an engine's stats snapshot (call once a second)."""
        tags = self.tags
        if store_usage is not None:
            self.store_rows.set(store_usage.rows, tags=tags)
            self.store_bytes.set(store_usage.bytes, tags=tags)
        self.sessions.set(stats.sessions, tags=tags)
        self.offloaded.set(offloaded, tags=tags)
        failed = checkpoint_failures - self._last.get("checkpoint_failures", 0)
        if failed > 0:
            self.checkpoint_failures.inc(failed, tags=tags)
        self._last["checkpoint_failures"] = checkpoint_failures
        self.slots_free.set(stats.slots_free, tags=tags)
        self.decoding.set(stats.decoding, tags=tags)
        self.queue_depth.set(stats.prefill_queue, tags=tags)
        self.kv_bytes.set(stats.kv_bytes, tags=tags)
        for name, counter in (
            ("generated_tokens", self.generated),
            ("decode_tokens", self.decode_tokens),
            ("prefill_tokens", self.prefill_tokens),
            ("turns_finished", self.turns),
        ):
            value = getattr(stats, name)
            delta = value - self._last.get(name, 0)
            if delta > 0:
                counter.inc(delta, tags=tags)
            self._last[name] = value
        for seconds in new_step_seconds:
            self.step_ms.observe(1000 * seconds, tags=tags)
