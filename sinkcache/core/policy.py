"""The sink + ring cache policy and StreamingLLM positions, as pure index arithmetic.

A slot holds `sink` tokens that are never evicted followed by a ring of `window` recent tokens.
`t` counts the tokens written into a slot (0-based). Token `t` lands at

    t < S  ->  index t                      (a sink)
    t >= S ->  index S + (t - S) mod W      (the ring overwrites the oldest recent token)

Keys are stored rotated by their *rotary position*: `t` for sinks, `base + t` for recent tokens,
where `base` is the slot's stream offset (0 for a session that started in this slot). Attention
depends only on the distance between query and key, so inside the recent part this equals the
cache-position numbering for any `base`; queries meet the sinks with a second rotation at their
*cache* position (docs/ARCHITECTURE.md, "The arena and positions"). All functions take and return int64 tensors.
"""

from __future__ import annotations

import torch


def write_index(t: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Physical index in the slot for token counter `t`."""
    ring = sink + torch.remainder(t - sink, window)
    return torch.where(t < sink, t, ring)


def rotary_position(t: torch.Tensor, base: torch.Tensor, sink: int) -> torch.Tensor:
    """Rotary position of token `t`: its own index for sinks, `base + t` in the recent part."""
    return torch.where(t < sink, t, base + t)


def sink_query_position(t: torch.Tensor, seen_after: torch.Tensor, capacity: int) -> torch.Tensor:
    """Cache position of query token `t` once the slot holds `seen_after` tokens in all.

    The tokens evicted so far are `max(0, seen_after - capacity)`; everything after the sinks
    shifts down by that many places.
    """
    evicted = torch.clamp(seen_after - capacity, min=0)
    return t - evicted


def key_token_counters(seen_after: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """For each slot row, the token counter held at every physical index; -1 where empty.

    seen_after [R] -> [R, sink + window]. Used by the reference attention for masks.
    """
    capacity = sink + window
    index = torch.arange(capacity, device=seen_after.device)[None, :]
    last = seen_after[:, None] - 1
    ring_t = last - torch.remainder(last - index, window)
    t = torch.where(index < sink, index, ring_t)
    valid = torch.where(index < sink, index < seen_after[:, None], ring_t >= sink)
    return torch.where(valid, t, torch.full_like(t, -1))
