"""Decode attention over sink + ring arena slots: a fused Triton kernel (flash-decoding).

Decoding is memory-bound, so the kernel is built to read each active slot's valid K/V exactly once
per step. One program owns one (row, kv_head, split): it loads the group's G query heads once and
streams BLOCK_N positions at a time straight out of the arena slot (no gather copy), keeping an
online softmax in fp32. Keys at index < sink meet `q_sink`, all others `q` (see reference.py); only
the tile(s) covering index < sink compute that second product.

When B * Hkv programs are too few to fill the GPU, the cache length is split across programs and a
small second kernel merges the partial (log-sum-exp, output) pairs. The split count comes from
shapes alone (B, Hkv, C), never from `seen`, so the launch is CUDA-graph capturable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sinkcache.core.attention.triton_tiles import (
    LOG2E,
    dot_f32,
    gdc_enter,
    load_kv_tile,
    pdl_enabled,
    pdl_launch,
    running_interpreted,
    tile_count,
)

__all__ = ["LOG2E", "decode_attention", "decode_attention_launch", "plan_splits"]

# Split-K rule, from CUDA-graph replay timings on an H100 (SmolLM2 and Llama-3-8B heads, C = 1024
# and 2048, full slots; see bench/kernel_check.py --sweep). With P = B * Hkv programs:
# - P < SMs / 2: the cache streams latency-bound; split until TARGET_WAVES waves of programs
#   (Llama C=2048: P=8 32 -> 11 us; P=32 48 -> 20 us; SmolLM2 C=2048 P=48 20 -> 16 us);
# - SMs / 2 <= P < SMs: 2 splits gain up to 20% (Llama P=96 56 -> 45 us, P=128 61 -> 55 us), more
#   splits lose it again in the merge (SmolLM2 P=96: 25 us whole, 27 us in 3);
# - P >= SMs: no split (P=144..192: 1-2 us worse split, at 20-80 us).
TARGET_WAVES = 2
MIN_TILES_PER_SPLIT = 1
MAX_SPLITS = 64


@triton.jit
def _attend_tile(
    q,  # [GROUP_PAD, HEAD_DIM] input dtype
    q_sink,  # [GROUP_PAD, HEAD_DIM] input dtype
    k_base,
    v_base,
    k_scale_base,
    v_scale_base,
    stride_k_pos,
    stride_v_pos,
    start,
    end,
    m_i,  # [GROUP_PAD] fp32, running max (log2 units)
    l_i,  # [GROUP_PAD] fp32, running sum
    acc,  # [GROUP_PAD, HEAD_DIM] fp32
    qk_scale,
    SINK: tl.constexpr,
    SINK_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_DOT: tl.constexpr,
    QUANT: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Fold keys [start, start + BLOCK_N) ∩ [0, end) into the running softmax state."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    in_range = pos < end
    k, v, k_scale, v_scale = load_kv_tile(
        k_base, v_base, k_scale_base, v_scale_base, stride_k_pos, stride_v_pos, pos, in_range,
        HEAD_DIM, QUANT,
    )  # fmt: skip
    if QUANT:  # e4m3 codes; the scales are applied to scores and probabilities
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    if USE_DOT:
        scores = dot_f32(q, tl.trans(k), INTERPRETER)  # [GROUP_PAD, BLOCK_N]
    else:
        scores = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
    if SINK_TILE:
        if USE_DOT:
            sink_scores = dot_f32(q_sink, tl.trans(k), INTERPRETER)
        else:
            sink_scores = tl.sum(
                q_sink[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2
            )
        scores = tl.where((pos < SINK)[None, :], sink_scores, scores)
    if QUANT:
        scores = scores * k_scale[None, :]
    scores = tl.where(in_range[None, :], scores * qk_scale, float("-inf"))
    # The first tile of a split always holds a valid key, so m_new is finite from then on.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])  # [GROUP_PAD, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if QUANT:
        p = p * v_scale[None, :]
    if USE_DOT:
        pv = dot_f32(p.to(v.dtype), v, INTERPRETER)
    else:
        pv = tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr,
    q_sink_ptr,
    k_ptr,
    v_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slots_ptr,
    seen_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    stride_q_row,
    stride_q_head,
    stride_qs_row,
    stride_qs_head,
    stride_k_slot,
    stride_k_head,
    stride_k_pos,
    stride_v_slot,
    stride_v_head,
    stride_v_pos,
    stride_ks_slot,
    stride_ks_head,
    stride_vs_slot,
    stride_vs_head,
    stride_o_row,
    stride_o_head,
    heads,
    capacity,
    split_len,
    num_splits,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SINK: tl.constexpr,
    SINK_TILES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr,
    QUANT: tl.constexpr,
    INTERPRETER: tl.constexpr,
    MAX_TILES: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (row, kv_head, split): attend the group's queries to the split's keys in the row's slot.

    The splits partition the recent region [sink_end, C) into runs of `split_len` positions; split
    0 also owns the sink tiles [0, sink_end), the only ones that need the q_sink product.
    """
    gdc_enter(PDL)
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    sink_end: tl.constexpr = SINK_TILES * BLOCK_N
    # Valid keys are physical indices < min(seen, C); capacity fits in int32.
    n_valid = tl.minimum(tl.load(seen_ptr + row), capacity).to(tl.int32)
    lo = sink_end + split * split_len
    if (split == 0) | (lo < n_valid):
        hi = tl.minimum(lo + split_len, n_valid)
        slot = tl.load(slots_ptr + row).to(tl.int64)
        k_base = k_ptr + slot * stride_k_slot + kv_head.to(tl.int64) * stride_k_head
        v_base = v_ptr + slot * stride_v_slot + kv_head.to(tl.int64) * stride_v_head
        ks_base = k_scale_ptr + slot * stride_ks_slot + kv_head.to(tl.int64) * stride_ks_head
        vs_base = v_scale_ptr + slot * stride_vs_slot + kv_head.to(tl.int64) * stride_vs_head

        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        head = kv_head * GROUP + offs_g  # [GROUP_PAD]
        in_group = offs_g < GROUP
        row64 = row.to(tl.int64)
        q = tl.load(
            q_ptr + row64 * stride_q_row + head[:, None] * stride_q_head + offs_d[None, :],
            mask=in_group[:, None],
            other=0.0,
        )  # [GROUP_PAD, HEAD_DIM]

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        if SINK > 0:  # noqa: SIM102 (compile-time test, then a run-time one)
            if split == 0:
                q_sink = tl.load(
                    q_sink_ptr
                    + row64 * stride_qs_row
                    + head[:, None] * stride_qs_head
                    + offs_d[None, :],
                    mask=in_group[:, None],
                    other=0.0,
                )  # [GROUP_PAD, HEAD_DIM]
                for tile in range(SINK_TILES):
                    m_i, l_i, acc = _attend_tile(
                        q, q_sink, k_base, v_base, ks_base, vs_base, stride_k_pos, stride_v_pos,
                        tile * BLOCK_N, n_valid, m_i, l_i, acc, qk_scale,
                        SINK, True, BLOCK_N, HEAD_DIM, USE_DOT, QUANT, INTERPRETER,
                    )  # fmt: skip
        for tile in range(tile_count(hi - lo, BLOCK_N, INTERPRETER, MAX_TILES)):
            m_i, l_i, acc = _attend_tile(
                q, q, k_base, v_base, ks_base, vs_base, stride_k_pos, stride_v_pos,
                lo + tile * BLOCK_N, hi, m_i, l_i, acc, qk_scale,
                SINK, False, BLOCK_N, HEAD_DIM, USE_DOT, QUANT, INTERPRETER,
            )  # fmt: skip

        out = acc / l_i[:, None]
        if SINGLE_SPLIT:
            o_ptrs = (
                out_ptr + row64 * stride_o_row + head[:, None] * stride_o_head + offs_d[None, :]
            )
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])
        else:
            # partials: lse [B, H, splits], out [B, H, splits, D], both fp32 and contiguous.
            part = (row64 * heads + head) * num_splits + split  # [GROUP_PAD]
            tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=in_group)
            tl.store(
                part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                out,
                mask=in_group[:, None],
            )


@triton.jit
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    seen_ptr,
    out_ptr,
    stride_o_row,
    stride_o_head,
    heads,
    capacity,
    sink_end,
    split_len,
    num_splits,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (row, head): merge the partial outputs of the splits that held valid keys."""
    gdc_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    n_valid = tl.minimum(tl.load(seen_ptr + row), capacity).to(tl.int32)
    # Split 0 always ran; split s > 0 ran iff its first position sink_end + s * split_len < n_valid.
    n_active = tl.maximum(tl.cdiv(tl.maximum(n_valid - sink_end, 0), split_len), 1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    active = offs_s < n_active
    part = (row * heads + head) * num_splits + offs_s  # [SPLITS_PAD]
    lse = tl.load(part_lse_ptr + part, mask=active, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    weight = weight / tl.sum(weight, axis=0)
    part_out = tl.load(
        part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=active[:, None], other=0.0
    )  # [SPLITS_PAD, HEAD_DIM]
    out = tl.sum(weight[:, None] * part_out, axis=0)
    tl.store(
        out_ptr + row * stride_o_row + head * stride_o_head + offs_d,
        out.to(out_ptr.dtype.element_ty),
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: plan as for an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(
    batch: int, kv_heads: int, capacity: int, sink: int, block_n: int, sm_count: int
) -> int:
    """How many programs share one (row, kv_head)'s cache, from shapes alone (no `seen`).

    See the split-K rule at the top of this module.
    """
    programs = max(1, batch * kv_heads)
    if programs >= sm_count:
        return 1
    if 2 * programs >= sm_count:
        splits = 2
    else:
        splits = triton.cdiv(TARGET_WAVES * sm_count, programs)
    recent_tiles = _recent_tiles(capacity, sink, block_n)
    splits = max(1, min(splits, recent_tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))
    return _split_layout(recent_tiles, splits)[0]


def _recent_tiles(capacity: int, sink: int, block_n: int) -> int:
    """Tiles past the sink tiles: what the splits share."""
    return triton.cdiv(max(capacity - triton.cdiv(sink, block_n) * block_n, 0), block_n)


def _split_layout(recent_tiles: int, splits: int) -> tuple[int, int]:
    """(splits, tiles per split) with no split starting past the cache."""
    tiles_per_split = max(1, triton.cdiv(recent_tiles, max(1, splits)))
    return max(1, triton.cdiv(recent_tiles, tiles_per_split)), tiles_per_split


def default_config(head_dim: int, quant: bool = False) -> dict:
    """Tile and launch options for the H100, from bench/kernel_check.py --sweep (graph replay).

    USE_DOT: the group (G <= 8 rows) is padded to 16 rows so QK^T and PV run on the tensor cores;
    the padding costs nothing in a memory-bound kernel. The broadcast-multiply + tl.sum form holds
    a [G, BLOCK_N, D] fp32 product in registers, so it needs tiny tiles (few bytes in flight): at
    D=64 it ran 4-6x slower (SmolLM2 shapes, B=16: 69 us vs 16 us; B=256: 833 us vs 143 us), and
    at D=128 it would spill. Tiles of 32-128 keys with 4 warps all ran within ~5% of each other.
    """
    config = dict(DECODE_CONFIGS[head_dim >= 128, quant])
    config.update(DECODE_CONFIG_OVERRIDE)
    return config


# (head_dim >= 128, fp8 arena) -> launch options; DECODE_CONFIG_OVERRIDE is for sweeps.
DECODE_CONFIGS = {
    (True, False): {"block_n": 64, "num_warps": 4, "num_stages": 2, "use_dot": True},
    (False, False): {"block_n": 128, "num_warps": 4, "num_stages": 3, "use_dot": True},
    (True, True): {"block_n": 64, "num_warps": 4, "num_stages": 3, "use_dot": True},
    (False, True): {"block_n": 128, "num_warps": 4, "num_stages": 3, "use_dot": True},
}
DECODE_CONFIG_OVERRIDE: dict = {}


@dataclass
class DecodePartials:
    """Split-K partial results of a decode launch, left for the consumer to merge (the fused
    o_proj of sinkcache.core.ops.triton_linear merges them in its prologue, saving a launch).

    lse [B, H, splits] and out [B, H, splits, D], float32; split s > 0 of row b holds data iff
    sink_end + s * split_len < min(seen[b], capacity) (split 0 always does)."""

    out: torch.Tensor
    lse: torch.Tensor
    seen: torch.Tensor
    capacity: int
    sink_end: int
    split_len: int
    num_splits: int

    @property
    def shape(self) -> tuple[int, int, int]:
        batch, heads, _, head_dim = self.out.shape
        return batch, heads, head_dim


def decode_attention_launch(
    q: torch.Tensor,
    q_sink: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seen: torch.Tensor,
    sink: int,
    scale: float,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool | None = None,
    out: torch.Tensor | None = None,
    poison_partials: bool = False,
    merge: bool = True,
) -> torch.Tensor | DecodePartials:
    """decode_attention with the launch choices exposed (tests use small tiles and forced splits).

    `k_scale`, `v_scale` [N, Hkv, C] float32: the per-position scales of an fp8 arena.
    `poison_partials` fills the split partials with NaN first, so a merge that reads one no split
    wrote shows up in the output (tests only). `merge=False` returns the split partials unmerged
    (DecodePartials) when the launch splits.
    """
    batch, heads, head_dim = q.shape
    _, kv_heads, capacity, _ = k_cache.shape
    group = heads // kv_heads
    assert heads == group * kv_heads, "query heads must be a multiple of kv heads"
    assert head_dim & (head_dim - 1) == 0 and head_dim >= 16, (
        "head_dim must be a power of two >= 16"
    )
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "arena rows must be contiguous"
    assert 0 <= sink <= capacity
    quant = k_scale is not None
    if quant:
        assert v_scale is not None and k_scale.stride(-1) == 1 and v_scale.stride(-1) == 1
        assert k_scale.shape == k_cache.shape[:3] and v_scale.shape == v_cache.shape[:3]
    else:
        k_scale = v_scale = k_cache  # unused
    q = q if q.stride(-1) == 1 else q.contiguous()
    q_sink = q_sink if q_sink.stride(-1) == 1 else q_sink.contiguous()
    dtype = q.dtype
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=dtype)  # [B, H, D]
    if batch == 0:
        return out

    config = default_config(head_dim, quant)
    block_n = block_n or config["block_n"]
    use_dot = config["use_dot"] if use_dot is None else use_dot
    sink_tiles = triton.cdiv(sink, block_n)
    sink_end = sink_tiles * block_n
    if num_splits is None:
        num_splits = plan_splits(batch, kv_heads, capacity, sink, block_n, _sm_count(q.device))
    num_splits, tiles_per_split = _split_layout(_recent_tiles(capacity, sink, block_n), num_splits)
    split_len = tiles_per_split * block_n
    group_pad = max(triton.next_power_of_2(group), 16 if use_dot else 1)

    single = num_splits == 1
    interpreter = running_interpreted(_decode_split_kernel)
    if single:
        part_out = part_lse = out  # unused
    else:
        part_lse = torch.empty((batch, heads, num_splits), device=q.device, dtype=torch.float32)
        part_out = torch.empty(
            (batch, heads, num_splits, head_dim), device=q.device, dtype=torch.float32
        )
        if poison_partials:
            part_lse.fill_(float("nan"))
            part_out.fill_(float("nan"))
    ks_strides = (k_scale.stride(0), k_scale.stride(1)) if quant else (0, 0)
    vs_strides = (v_scale.stride(0), v_scale.stride(1)) if quant else (0, 0)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, q_sink, k_cache, v_cache, k_scale, v_scale, slots, seen, out, part_out, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1), q_sink.stride(0), q_sink.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *ks_strides, *vs_strides,
        out.stride(0), out.stride(1),
        heads, capacity, split_len, num_splits,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, SINK=sink, SINK_TILES=sink_tiles,
        BLOCK_N=block_n, SINGLE_SPLIT=single, USE_DOT=use_dot, QUANT=quant,
        INTERPRETER=interpreter, MAX_TILES=tiles_per_split if interpreter else 0,
        PDL=pdl_enabled(), **pdl_launch(),
        num_warps=num_warps or config["num_warps"],
        num_stages=num_stages or config["num_stages"],
    )  # fmt: skip
    if single:
        return out
    if not merge:
        return DecodePartials(part_out, part_lse, seen, capacity, sink_end, split_len, num_splits)
    _decode_merge_kernel[(batch, heads)](
        part_out, part_lse, seen, out,
        out.stride(0), out.stride(1),
        heads, capacity, sink_end, split_len, num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        PDL=pdl_enabled(), **pdl_launch(),
        num_warps=4 if head_dim >= 128 else 2,
    )  # fmt: skip
    return out


def decode_attention(
    q: torch.Tensor,
    q_sink: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seen: torch.Tensor,
    sink: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    *,
    merge: bool = True,
) -> torch.Tensor | DecodePartials:
    """One query per row. q, q_sink [B, H, D]; slots, seen [B] -> [B, H, D] in q's dtype.

    Same function as reference.decode_attention: keys j < min(seen, C) of slot `slots[b]`
    (dequantised by `k_scale`, `v_scale` for an fp8 arena). `merge=False`: see
    decode_attention_launch.
    """
    return decode_attention_launch(
        q, q_sink, k_cache, v_cache, slots, seen, sink, scale,
        k_scale=k_scale, v_scale=v_scale, merge=merge,
    )  # fmt: skip
