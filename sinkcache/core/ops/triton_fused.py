"""Fused decoder ops as Triton kernels: one launch each, same signatures as reference.py.

A decode step on a small model is launch-bound, so each op does in one kernel what the reference
does in several PyTorch ops, reading and writing every row once:

- add_rms_norm: one program per token row; residual add, float32 sum of squares, normalise,
  weight, both outputs written from registers (the whole row is one tile).
- rope_store: one program per token row; loads the row's cos/sin pairs once and its whole qkv
  row as one tile, rotates the q heads twice (q and q_sink) and the k heads once, writes q and
  q_sink, and scatters k and v straight into the arena at (slot, write_index), int64 offsets.
- silu_mul: one program per (row, block of the intermediate width).

Rotate-half is done on half-heads: out[:D/2] = x1 cos1 - x2 sin1, out[D/2:] = x2 cos2 + x1 sin2, so
every load and store is a contiguous run of D/2 elements; warps are sized so that each thread
moves one 16-byte vector (8 bf16) per access where the tile is large enough.
Grids depend on shapes only and nothing reads back to the host, so all three are CUDA-graph safe.
Math is float32; each intermediate the reference rounds to the activation dtype is rounded here
too, so bf16 results match the reference bit for bit up to float32 summation order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sinkcache.core.attention.triton_tiles import (
    fp8_scale,
    gdc_enter,
    pdl_enabled,
    pdl_launch,
    quantize_fp8,
    running_interpreted,
)

# A third Triton 3.6 interpreter workaround (see triton_decode.py for the other two): its float32 ->
# bfloat16 cast truncates where the GPU (and PyTorch) round to nearest even, so under INTERPRETER
# `round_to` rounds by hand. Only the CPU test path takes that branch.


@triton.jit
def _bf16_round_nearest_even(x):
    """float32 -> bfloat16, round to nearest, ties to even (as cvt.rn.bf16.f32 does)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _interpreter_round_to(x, dtype: tl.constexpr):
    if dtype == tl.bfloat16:
        return _bf16_round_nearest_even(x)
    else:
        return x.to(dtype)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """float32 x -> dtype, rounding to nearest even like PyTorch."""
    if INTERPRETER:
        return _interpreter_round_to(x, dtype)
    else:
        return x.to(dtype)


def _num_warps(elements: int, element_size: int) -> int:
    """Warps for a tile of `elements`: one 16-byte vector per thread (8 bf16, 4 fp32), 1 to 8."""
    return max(1, min(8, elements * element_size // (16 * 32)))


# ----------------------------------------------------------------------------------------------
# add_rms_norm


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    normed_ptr,
    new_residual_ptr,
    stride_x,
    stride_residual,
    stride_normed,
    stride_new_residual,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRETER: tl.constexpr,
    PDL: tl.constexpr,
):
    """One token row: new_residual = residual + x; normed = weight * rms_normalise(new_residual)."""
    gdc_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    in_row = offs < HIDDEN
    act_dtype: tl.constexpr = new_residual_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=in_row, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offs, mask=in_row, other=0.0)
        summed = round_to(x + residual.to(tl.float32), act_dtype, INTERPRETER)
        tl.store(new_residual_ptr + row * stride_new_residual + offs, summed, mask=in_row)
        x = summed.to(tl.float32)  # the reference normalises the rounded sum
    mean_square = tl.sum(x * x, axis=0) / HIDDEN
    normalised = round_to(x * tl.math.rsqrt(mean_square + eps), act_dtype, INTERPRETER)
    weight = tl.load(weight_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
    normed = round_to(weight * normalised.to(tl.float32), normed_ptr.dtype.element_ty, INTERPRETER)
    tl.store(normed_ptr + row * stride_normed + offs, normed, mask=in_row)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) as reference.add_rms_norm. x, residual [T, hidden]; weight [hidden].

    `out` / `residual_out` take preallocated outputs (tests poison them); with residual None the
    new residual is x itself and nothing is written for it.
    """
    tokens, hidden = x.shape
    assert x.stride(-1) == 1 and weight.is_contiguous() and weight.shape == (hidden,)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
        new_residual = torch.empty_like(x) if residual_out is None else residual_out
    else:
        new_residual = x
    if out is None:
        dtype = torch.promote_types(weight.dtype, x.dtype)  # as `weight * normalised` promotes
        out = torch.empty((tokens, hidden), device=x.device, dtype=dtype)
    if tokens == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(tokens,)](
        x, x if residual is None else residual, weight, out, new_residual,
        x.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
        new_residual.stride(0),
        eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        INTERPRETER=running_interpreted(_add_rms_norm_kernel),
        PDL=pdl_enabled(), **pdl_launch(),
        num_warps=_num_warps(block, x.element_size()),
    )  # fmt: skip
    return out, new_residual


# ----------------------------------------------------------------------------------------------
# rope_store


@triton.jit
def _rotate(x_lo, x_hi, cos_lo, cos_hi, sin_lo, sin_hi):
    """Rotate-half on half-heads: x * cos + cat(-x_hi, x_lo) * sin.

    x_lo, x_hi [ROWS, HALF_PAD] float32; cos/sin halves [HALF_PAD] float32.
    """
    out_lo = x_lo * cos_lo[None, :] - x_hi * sin_lo[None, :]
    out_hi = x_hi * cos_hi[None, :] + x_lo * sin_hi[None, :]
    return out_lo, out_hi


@triton.jit
def _store_halves(dst, offs_lo, mask, lo, hi, HALF: tl.constexpr):
    """dst [ROWS, 1] pointers to each head's first element; lo, hi [ROWS, HALF_PAD]."""
    tl.store(dst + offs_lo[None, :], lo, mask=mask)
    tl.store(dst + HALF + offs_lo[None, :], hi, mask=mask)


@triton.jit
def _store_fp8_halves(
    dst, scale_dst, offs_lo, mask, row_mask, lo, hi, HALF: tl.constexpr, INTERPRETER: tl.constexpr
):
    """An fp8 arena's store of whole head vectors: lo, hi [ROWS, HALF_PAD] float32 (zero past the
    half), dst [ROWS, 1] and scale_dst [ROWS] pointers; one scale max|x| / 448 per row."""
    amax = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))
    scale = fp8_scale(amax)  # [ROWS]
    tl.store(scale_dst, scale, mask=row_mask)
    lo = quantize_fp8(lo, scale, INTERPRETER)
    hi = quantize_fp8(hi, scale, INTERPRETER)
    _store_halves(dst, offs_lo, mask, lo, hi, HALF)


@triton.jit
def _rope_store_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    sink_cos_ptr,
    sink_sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    slots_ptr,
    write_index_ptr,
    q_ptr,
    q_sink_ptr,
    stride_qkv,
    stride_cos,
    stride_sin,
    stride_sink_cos,
    stride_sink_sin,
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
    stride_q,
    stride_q_sink,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    ROWS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    QUANT: tl.constexpr,
    INTERPRETER: tl.constexpr,
    PDL: tl.constexpr,
):
    """One token row. Its H + 2 Hkv heads (q, then k, then v) are one [ROWS_PAD, D] tile, held
    as two [ROWS_PAD, D/2] halves: q rows are rotated both ways and stored to q and q_sink, k rows
    rotated and stored to the arena, v rows stored to the arena as they are. One tile shape for
    every head keeps each thread on a 16-byte run however few k/v heads there are."""
    gdc_enter(PDL)
    HALF: tl.constexpr = HEAD_DIM // 2
    K_START: tl.constexpr = NUM_HEADS
    V_START: tl.constexpr = NUM_HEADS + NUM_KV_HEADS
    token = tl.program_id(0).to(tl.int64)
    offs_lo = tl.arange(0, HALF_PAD)
    if HALF_PAD == HALF:
        in_half = tl.full([HALF_PAD], 1, tl.int1)  # no mask along D: keeps 16-byte vectors
    else:
        in_half = offs_lo < HALF
    act_dtype: tl.constexpr = q_ptr.dtype.element_ty
    cache_dtype: tl.constexpr = k_cache_ptr.dtype.element_ty

    # The token's two rotations, each loaded once: [HALF_PAD] float32.
    cos_row, sin_row = cos_ptr + token * stride_cos, sin_ptr + token * stride_sin
    cos_lo = tl.load(cos_row + offs_lo, mask=in_half, other=0.0)
    cos_hi = tl.load(cos_row + HALF + offs_lo, mask=in_half, other=0.0)
    sin_lo = tl.load(sin_row + offs_lo, mask=in_half, other=0.0)
    sin_hi = tl.load(sin_row + HALF + offs_lo, mask=in_half, other=0.0)
    sink_cos_row = sink_cos_ptr + token * stride_sink_cos
    sink_sin_row = sink_sin_ptr + token * stride_sink_sin
    sink_cos_lo = tl.load(sink_cos_row + offs_lo, mask=in_half, other=0.0)
    sink_cos_hi = tl.load(sink_cos_row + HALF + offs_lo, mask=in_half, other=0.0)
    sink_sin_lo = tl.load(sink_sin_row + offs_lo, mask=in_half, other=0.0)
    sink_sin_hi = tl.load(sink_sin_row + HALF + offs_lo, mask=in_half, other=0.0)

    # The token's whole qkv row, one load: [ROWS_PAD, HALF_PAD] x 2 halves.
    head = tl.arange(0, ROWS_PAD)  # q heads, then k heads, then v heads
    is_q = (head < K_START)[:, None] & in_half[None, :]
    is_k = ((head >= K_START) & (head < V_START))[:, None] & in_half[None, :]
    is_v = ((head >= V_START) & (head < V_START + NUM_KV_HEADS))[:, None] & in_half[None, :]
    src = qkv_ptr + token * stride_qkv + head[:, None] * HEAD_DIM
    x_lo = tl.load(src + offs_lo[None, :], mask=is_q | is_k | is_v, other=0.0).to(tl.float32)
    x_hi = tl.load(src + HALF + offs_lo[None, :], mask=is_q | is_k | is_v, other=0.0)
    x_hi = x_hi.to(tl.float32)

    # Recent rotation: q rows -> q; k rows -> arena (rounded to the activation dtype first, as the
    # reference rotates, then casts to the cache dtype).
    lo, hi = _rotate(x_lo, x_hi, cos_lo, cos_hi, sin_lo, sin_hi)
    lo, hi = round_to(lo, act_dtype, INTERPRETER), round_to(hi, act_dtype, INTERPRETER)
    q_dst = q_ptr + token * stride_q + head[:, None] * HEAD_DIM
    _store_halves(q_dst, offs_lo, is_q, lo, hi, HALF)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    position = tl.load(write_index_ptr + token).to(tl.int64)
    k_head = tl.where(head >= K_START, head - K_START, 0).to(tl.int64)
    k_dst = k_cache_ptr + slot * stride_k_slot + position * stride_k_pos
    k_dst += k_head[:, None] * stride_k_head
    if QUANT:
        k_scale_dst = k_scale_ptr + slot * stride_ks_slot + position + k_head * stride_ks_head
        _store_fp8_halves(
            k_dst, k_scale_dst, offs_lo, is_k, (head >= K_START) & (head < V_START),
            lo.to(tl.float32), hi.to(tl.float32), HALF, INTERPRETER,
        )  # fmt: skip
    else:
        lo = round_to(lo.to(tl.float32), cache_dtype, INTERPRETER)
        hi = round_to(hi.to(tl.float32), cache_dtype, INTERPRETER)
        _store_halves(k_dst, offs_lo, is_k, lo, hi, HALF)

    # Sink rotation (only its q rows are stored) -> q_sink.
    lo, hi = _rotate(x_lo, x_hi, sink_cos_lo, sink_cos_hi, sink_sin_lo, sink_sin_hi)
    q_sink_dst = q_sink_ptr + token * stride_q_sink + head[:, None] * HEAD_DIM
    lo, hi = round_to(lo, act_dtype, INTERPRETER), round_to(hi, act_dtype, INTERPRETER)
    _store_halves(q_sink_dst, offs_lo, is_q, lo, hi, HALF)

    # v rows -> arena, unrotated.
    v_head = tl.where(head >= V_START, head - V_START, 0).to(tl.int64)
    v_dst = v_cache_ptr + slot * stride_v_slot + position * stride_v_pos
    v_dst += v_head[:, None] * stride_v_head
    if QUANT:
        v_scale_dst = v_scale_ptr + slot * stride_vs_slot + position + v_head * stride_vs_head
        _store_fp8_halves(
            v_dst, v_scale_dst, offs_lo, is_v,
            (head >= V_START) & (head < V_START + NUM_KV_HEADS), x_lo, x_hi, HALF, INTERPRETER,
        )  # fmt: skip
    else:
        lo = round_to(x_lo, cache_dtype, INTERPRETER)
        hi = round_to(x_hi, cache_dtype, INTERPRETER)
        _store_halves(v_dst, offs_lo, is_v, lo, hi, HALF)


def scale_args(k_scale, v_scale, dummy) -> tuple:
    """(k_scale, v_scale, their slot and head strides) for a kernel; dummies without scales."""
    if k_scale is None:
        return dummy, dummy, 0, 0, 0, 0
    assert v_scale is not None and k_scale.stride(-1) == 1 and v_scale.stride(-1) == 1
    return (
        k_scale, v_scale,
        k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1),
    )  # fmt: skip


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sink_cos: torch.Tensor,
    sink_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    write_index: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, q_sink) [T, H, D] as reference.rope_store, k and v written into the arena (as e4m3 codes
    with their scales when `k_scale`, `v_scale` [N, Hkv, C] float32 are given).

    qkv [T, (H + 2 Hkv) D]; cos, sin, sink_cos, sink_sin [T, D] float32; k_cache, v_cache
    [N, Hkv, C, D]; slots, write_index [T] (no two tokens may share a (slot, index) position).
    `out` takes preallocated (q, q_sink) (tests poison them).
    """
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    rows = num_heads + 2 * num_kv_heads
    assert head_dim % 2 == 0 and k_cache.shape[1] == v_cache.shape[1] == num_kv_heads
    assert qkv.shape[1] == rows * head_dim and qkv.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "arena rows must be contiguous"
    tables = [t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin, sink_cos, sink_sin)]
    assert all(t.shape == (tokens, head_dim) for t in tables)
    if out is None:
        q = torch.empty((tokens, num_heads, head_dim), device=qkv.device, dtype=qkv.dtype)
        q_sink = torch.empty_like(q)
    else:
        q, q_sink = out
    assert q.stride(-1) == 1 and q.stride(1) == head_dim and q_sink.stride(1) == head_dim
    if tokens == 0:
        return q, q_sink
    rows_pad = triton.next_power_of_2(rows)
    half_pad = triton.next_power_of_2(head_dim // 2)
    quant = k_scale is not None
    scales = scale_args(k_scale, v_scale, k_cache)
    _rope_store_kernel[(tokens,)](
        qkv, *tables, k_cache, v_cache, scales[0], scales[1], slots, write_index, q, q_sink,
        qkv.stride(0), *(t.stride(0) for t in tables),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *scales[2:],
        q.stride(0), q_sink.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, ROWS_PAD=rows_pad,
        HEAD_DIM=head_dim, HALF_PAD=half_pad, QUANT=quant,
        INTERPRETER=running_interpreted(_rope_store_kernel),
        PDL=pdl_enabled(), **pdl_launch(),
        num_warps=_num_warps(rows_pad * half_pad, qkv.element_size()),
    )  # fmt: skip
    return q, q_sink


# ----------------------------------------------------------------------------------------------
# silu_mul


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_gate_up,
    stride_out,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRETER: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (row, block): out = silu(gate) * up, each product rounded as F.silu(gate) * up is."""
    gdc_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    act_dtype: tl.constexpr = out_ptr.dtype.element_ty
    src = gate_up_ptr + row * stride_gate_up + offs
    if INTERMEDIATE % BLOCK == 0:  # no mask: keeps 16-byte vectors
        gate = tl.load(src).to(tl.float32)
        up = tl.load(src + INTERMEDIATE).to(tl.float32)
    else:
        gate = tl.load(src, mask=offs < INTERMEDIATE, other=0.0).to(tl.float32)
        up = tl.load(src + INTERMEDIATE, mask=offs < INTERMEDIATE, other=0.0).to(tl.float32)
    silu = round_to(tl.div_rn(gate, 1.0 + tl.exp(-gate)), act_dtype, INTERPRETER)
    out = round_to(silu.to(tl.float32) * up, act_dtype, INTERPRETER)
    if INTERMEDIATE % BLOCK == 0:
        tl.store(out_ptr + row * stride_out + offs, out)
    else:
        tl.store(out_ptr + row * stride_out + offs, out, mask=offs < INTERMEDIATE)


def _silu_block(intermediate: int) -> int:
    """The largest power of two <= 1024 dividing the width (no masks), else one masked tile."""
    block = 1024
    while block >= 128:
        if intermediate % block == 0:
            return block
        block //= 2
    return min(1024, triton.next_power_of_2(intermediate))


def silu_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I], as reference.silu_mul."""
    tokens, width = gate_up.shape
    intermediate = width // 2
    assert width == 2 * intermediate and gate_up.stride(-1) == 1
    if out is None:
        out = torch.empty((tokens, intermediate), device=gate_up.device, dtype=gate_up.dtype)
    if tokens == 0:
        return out
    block = _silu_block(intermediate)
    _silu_mul_kernel[(tokens, triton.cdiv(intermediate, block))](
        gate_up, out, gate_up.stride(0), out.stride(0),
        INTERMEDIATE=intermediate, BLOCK=block,
        INTERPRETER=running_interpreted(_silu_mul_kernel),
        PDL=pdl_enabled(), **pdl_launch(),
        num_warps=_num_warps(block, gate_up.element_size()),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# decode_prep

_TWO_PI = tl.constexpr(2.0 * math.pi)


@triton.jit
def _cos_sin_row(position, inv_freq, scaling, cos_dst, sin_dst, offs, in_half, HALF: tl.constexpr):
    """cos/sin of one int64 position (angles in float64, reduced mod 2π, then float32), stored
    to both halves of a [D] row as rotary_cos_sin repeats them."""
    angle = (position.to(tl.float64) * inv_freq) % _TWO_PI  # >= 0: fmod is the remainder
    angle = angle.to(tl.float32)
    c = tl.cos(angle) * scaling
    s = tl.sin(angle) * scaling
    tl.store(cos_dst + offs, c, mask=in_half)
    tl.store(cos_dst + HALF + offs, c, mask=in_half)
    tl.store(sin_dst + offs, s, mask=in_half)
    tl.store(sin_dst + HALF + offs, s, mask=in_half)


@triton.jit
def _decode_prep_kernel(
    slots_ptr,
    seen_ptr,
    base_ptr,
    next_token_ptr,
    inv_freq_ptr,
    token_ids_ptr,
    write_index_ptr,
    seen_after_ptr,
    cos_ptr,
    sin_ptr,
    sink_cos_ptr,
    sink_sin_ptr,
    scaling,
    SINK: tl.constexpr,
    WINDOW: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """One decode row: its token, write index, counter and both rotations (reference.decode_prep)."""
    gdc_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    t = tl.load(seen_ptr + slot)
    base = tl.load(base_ptr + slot)
    tl.store(token_ids_ptr + row, tl.load(next_token_ptr + slot))
    tl.store(seen_after_ptr + row, t + 1)
    is_sink = t < SINK
    ring = SINK + (tl.maximum(t - SINK, 0) % WINDOW)
    tl.store(write_index_ptr + row, tl.where(is_sink, t, ring))
    rotary = tl.where(is_sink, t, base + t)
    sink_position = t - tl.maximum(t + 1 - (SINK + WINDOW), 0)
    offs = tl.arange(0, HALF_PAD)
    in_half = offs < HALF
    inv_freq = tl.load(inv_freq_ptr + offs, mask=in_half, other=0.0)
    dim: tl.constexpr = 2 * HALF
    _cos_sin_row(rotary, inv_freq, scaling, cos_ptr + row * dim, sin_ptr + row * dim,
                 offs, in_half, HALF)  # fmt: skip
    _cos_sin_row(sink_position, inv_freq, scaling, sink_cos_ptr + row * dim,
                 sink_sin_ptr + row * dim, offs, in_half, HALF)  # fmt: skip


def decode_prep(
    slots: torch.Tensor,
    seen: torch.Tensor,
    base: torch.Tensor,
    next_token: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
    sink: int,
    window: int,
) -> tuple[torch.Tensor, ...]:
    """reference.decode_prep in one launch (a graph decode step's whole batch set-up)."""
    batch, half = slots.shape[0], inv_freq.shape[0]
    assert inv_freq.dtype == torch.float64 and inv_freq.is_contiguous()
    device = slots.device
    token_ids = torch.empty(batch, dtype=torch.int64, device=device)
    index = torch.empty(batch, dtype=torch.int64, device=device)
    seen_after = torch.empty(batch, dtype=torch.int64, device=device)
    tables = [torch.empty((batch, 2 * half), dtype=torch.float32, device=device) for _ in range(4)]
    if batch:
        _decode_prep_kernel[(batch,)](
            slots, seen, base, next_token, inv_freq, token_ids, index, seen_after, *tables,
            float(scaling),
            SINK=sink, WINDOW=window, HALF=half, HALF_PAD=triton.next_power_of_2(half),
            PDL=pdl_enabled(), **pdl_launch(),
            num_warps=1,
        )  # fmt: skip
    return (token_ids, index, seen_after, *tables)
