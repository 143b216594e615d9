"""KVArena: one preallocated K/V pool with one fixed-size sink + window slot per session.

Everything is allocated once, in `__init__`; serving any number of tokens afterwards writes into
these tensors and allocates no cache memory. Slots are handed out from a free list in O(1). Per-slot
metadata lives in small device tensors so a batch is described by a tensor of slot indices.
"""

from __future__ import annotations

import torch

from sinkcache.config import CacheGeometry, ModelShape
from sinkcache.errors import ArenaFullError


def slots_for_budget(
    shape: ModelShape, geometry: CacheGeometry, dtype: torch.dtype, budget_bytes: int
) -> int:
    """How many slots fit in `budget_bytes` of K/V memory."""
    per_slot = shape.kv_bytes_per_token(torch.finfo(dtype).bits // 8) * geometry.capacity
    return max(0, budget_bytes // per_slot)


class KVArena:
    """The K/V pool plus slot bookkeeping. Slot `num_slots` is a scratch slot for padded rows."""

    def __init__(
        self,
        shape: ModelShape,
        geometry: CacheGeometry,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_slots < 1:
            raise ValueError("an arena needs at least one slot")
        self.shape = shape
        self.geometry = geometry
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        self.dtype = dtype
        self.device = torch.device(device)
        rows = num_slots + 1
        cap = geometry.capacity
        kv_shape = (shape.num_layers, rows, shape.num_kv_heads, cap, shape.head_dim)
        # K, V: [layers, slots + 1, kv_heads, capacity, head_dim]. Zeroed once so that no row ever
        # reads uninitialised memory (NaN * 0 would still poison a masked product).
        self.k = torch.zeros(kv_shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(kv_shape, dtype=dtype, device=self.device)
        # Per-slot metadata, indexed by slot:
        self.seen = torch.zeros(rows, dtype=torch.int64, device=self.device)  # tokens written
        self.base = torch.zeros(rows, dtype=torch.int64, device=self.device)  # rotary offset
        self.next_token = torch.zeros(rows, dtype=torch.int64, device=self.device)  # last sampled
        self._free: list[int] = list(range(num_slots - 1, -1, -1))

    # -- slots -----------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self, base: int = 0) -> int:
        """Take a free slot and reset its metadata; `base` offsets its rotary positions."""
        if not self._free:
            raise ArenaFullError(f"all {self.num_slots} cache slots are in use")
        slot = self._free.pop()
        self.seen[slot] = 0
        self.base[slot] = base
        return slot

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

    # -- views -------------------------------------------------------------------------------------
    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer, each [slots + 1, kv_heads, capacity, head_dim]."""
        return self.k[layer], self.v[layer]

    def nbytes(self) -> int:
        tensors = (self.k, self.v, self.seen, self.base, self.next_token)
        return sum(t.numel() * t.element_size() for t in tensors)
