"""KVArena: one preallocated K/V pool with one fixed-size sink + window slot per session.

Everything is allocated once, in `__init__`; serving any number of tokens afterwards writes into
these tensors and allocates no cache memory. Slots are handed out from a free list in O(1). Per-slot
metadata lives in small device tensors so a batch is described by a tensor of slot indices.

The arena stores K/V in the model's dtype, or as fp8 (e4m3) codes with one float32 scale per token
and head (`kv_dtype=FP8`): each stored head vector x [D] keeps x / s with s = max|x| / 448, so every
token uses the format's whole range whatever the magnitudes of its neighbours (keys carry outlier
channels whose size changes from token to token; one scale per head for all tokens would spend
most codes on the largest). At D = 64 the scales add 4 bytes per 64 (6%).
"""

from __future__ import annotations

import torch

from sinkcache.config import CacheGeometry, ModelShape
from sinkcache.errors import ArenaFullError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
FP8_MIN_SCALE_AMAX = 1e-12  # a head of zeros still gets a finite, non-zero scale
KV_DTYPES = {"fp8_e4m3": FP8}  # EngineConfig.kv_dtype names; "auto" is the model dtype


def kv_bytes_per_slot(shape: ModelShape, geometry: CacheGeometry, kv_dtype: torch.dtype) -> int:
    """Bytes one slot takes in the arena: K and V, plus the scales of an fp8 arena."""
    per_token = shape.kv_bytes_per_token(torch.finfo(kv_dtype).bits // 8)
    if kv_dtype == FP8:
        per_token += 2 * shape.num_layers * shape.num_kv_heads * 4  # a float32 scale per head
    return per_token * geometry.capacity


def slots_for_budget(
    shape: ModelShape, geometry: CacheGeometry, kv_dtype: torch.dtype, budget_bytes: int
) -> int:
    """How many slots fit in `budget_bytes` of K/V memory."""
    return max(0, budget_bytes // kv_bytes_per_slot(shape, geometry, kv_dtype))


class KVArena:
    """The K/V pool plus slot bookkeeping. Slot `num_slots` is a scratch slot for padded rows."""

    def __init__(
        self,
        shape: ModelShape,
        geometry: CacheGeometry,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError("an arena needs at least one slot")
        kv_dtype = kv_dtype or dtype
        if kv_dtype not in (dtype, FP8):
            raise ValueError(f"the arena stores {dtype} or {FP8}, not {kv_dtype}")
        self.shape = shape
        self.geometry = geometry
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        self.dtype = dtype  # the activations' dtype
        self.kv_dtype = kv_dtype  # what K/V are stored as
        self.device = torch.device(device)
        rows = num_slots + 1
        cap = geometry.capacity
        kv_shape = (shape.num_layers, rows, shape.num_kv_heads, cap, shape.head_dim)
        # K, V: [layers, slots + 1, kv_heads, capacity, head_dim]. Zeroed once so that no row ever
        # reads uninitialised memory (NaN * 0 would still poison a masked product).
        self.k = torch.zeros(kv_shape, dtype=kv_dtype, device=self.device)
        self.v = torch.zeros(kv_shape, dtype=kv_dtype, device=self.device)
        # fp8: K_scale, V_scale [layers, slots + 1, kv_heads, capacity] float32.
        self.k_scale = self.v_scale = None
        if kv_dtype == FP8:
            self.k_scale = torch.zeros(kv_shape[:-1], dtype=torch.float32, device=self.device)
            self.v_scale = torch.zeros(kv_shape[:-1], dtype=torch.float32, device=self.device)
        # Per-slot metadata, indexed by slot:
        self.seen = torch.zeros(rows, dtype=torch.int64, device=self.device)  # tokens written
        self.base = torch.zeros(rows, dtype=torch.int64, device=self.device)  # rotary offset
        self.next_token = torch.zeros(rows, dtype=torch.int64, device=self.device)  # last sampled
        self._free: list[int] = list(range(num_slots - 1, -1, -1))

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

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

    def layer_scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K scales, V scales) of one layer, each [slots + 1, kv_heads, capacity]; None, None for
        an arena in the model's dtype."""
        if self.k_scale is None:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def nbytes(self) -> int:
        tensors = [self.k, self.v, self.seen, self.base, self.next_token]
        if self.k_scale is not None:
            tensors += [self.k_scale, self.v_scale]
        return sum(t.numel() * t.element_size() for t in tensors)
