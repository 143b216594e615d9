"""Scale session replicas on cache-slot occupancy, not request counts.

Ray Serve's default policy counts ongoing Serve requests; our sessions are gRPC streams Serve never
sees. Each replica reports `slots_used` and `slots_total` (SessionReplica.record_autoscaling_stats)
and this policy, run by Serve's controller, keeps the resident sessions near `target` of all slots:
it scales up at once and down only after occupancy stayed low for `downscale_delay_s` (scale-in
drains a replica: its sessions are checkpointed and rebuilt elsewhere on their next message).
It must stay importable by the controller: standard library and Ray only.
"""

from __future__ import annotations

import math
from typing import Any


class SlotOccupancyPolicy:
    """A class policy (Serve instantiates it once with `policy_kwargs`)."""

    def __init__(self, target: float = 0.75, downscale_delay_s: float = 60.0) -> None:
        self.target = target
        self.downscale_delay_s = downscale_delay_s

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        metrics = ctx.aggregated_metrics
        if callable(metrics):
            metrics = metrics()
        used = (metrics or {}).get("slots_used", {})
        total = (metrics or {}).get("slots_total", {})
        current = ctx.current_num_replicas
        if not total:
            return max(current, ctx.capacity_adjusted_min_replicas), state
        slots_per_replica = sum(total.values()) / len(total)
        wanted = desired_replicas(sum(used.values()), slots_per_replica, self.target)
        wanted = min(
            max(wanted, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas
        )
        now = ctx.current_time
        if wanted >= current:
            state.pop("low_since", None)
            return wanted, state
        low_since = state.setdefault("low_since", now)
        if now is not None and low_since is not None and now - low_since >= self.downscale_delay_s:
            state.pop("low_since", None)
            return wanted, state
        return current, state


def desired_replicas(slots_used: float, slots_per_replica: float, target: float) -> int:
    """Replicas needed for `slots_used` resident sessions at `target` occupancy (at least one)."""
    if slots_per_replica <= 0:
        return 1
    return max(1, math.ceil(slots_used / (slots_per_replica * target)))
