"""Small-batch decoder layers as four Triton kernels: the element-wise ops folded into the matmuls.

A decode step of a small model is a chain of latency-bound launches (docs/BENCHMARKS.md, section
7), so these kernels run a layer as

    norm_qkv_rope       add + RMSNorm (prologue) -> x @ Wqkv^T -> RoPE, q and q_sink out, k and v
                        into the arena (epilogue; quantised there for an fp8 arena)
    decode attention    (sinkcache.core.attention.triton_decode, split partials left unmerged)
    linear (o_proj)     merge of the attention splits (prologue) -> @ Wo^T
    norm_gate_up_silu   add + RMSNorm (prologue) -> x @ Wgate^T, x @ Wup^T -> silu(gate) * up
    linear (down)       @ Wdown^T

against ten launches op by op (norm, GEMM, rope_store, attention, merge, GEMM, norm, GEMM, silu_mul,
GEMM). SiLU-mul goes into gate_up's epilogue rather than down's prologue: there each program makes
its own columns once, while every program of down would recompute all of them.

Every program owns a block of rows and a *pair* of column blocks: for RoPE the low and high halves
of one head (rotate-half pairs element d with d + D/2), for SiLU-mul the same columns of gate and
up. Each program normalises its rows itself (two passes over the row: sum of squares, then the
scaled tiles feed the dot), which costs nothing next to the weights it streams. Rounding follows
the op-by-op path (sinkcache.core.ops.reference): the normalised row, the matmul output, the
rotated values and the SiLU product are each rounded to the activation dtype where PyTorch rounds
them, so results differ from it only by float32 summation order.

Grids depend on shapes only; nothing reads back to the host, so every launch is graph-capturable.

Measured on the H200 they halve the launches of a step but lose overall: their small-M matmuls take
9-12 us where cuBLAS takes 3.7-3.9 us, so `fused_rows` is 0 for every model unless
SINKSERVE_FUSED_ROWS says otherwise (the benches and tests set it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sinkcache.config import ModelShape
from sinkcache.core.attention.triton_decode import DecodePartials
from sinkcache.core.attention.triton_tiles import (
    dot_f32,
    fp8_scale,
    gdc_enter,
    pdl_enabled,
    pdl_launch,
    quantize_fp8,
    running_interpreted,
)
from sinkcache.core.ops.triton_fused import round_to, scale_args

# ----------------------------------------------------------------------------------------------
# when and how: rows up to fused_rows(shape) take these kernels (else cuBLAS and the op kernels)

# Per model width (hidden size): the most rows a step may have and still take the fused kernels.
# Measured on the H200 (docs/BENCHMARKS.md, section 7): these kernels halve the launches but
# their small-M matmuls run 2-3x slower than cuBLAS (SmolLM2, one row: 1.54 ms a step against
# 1.00 op by op; Llama-3-8B, 128 rows: 29.4 against 9.4), so no width takes them by default.
FUSED_ROWS: dict[int, int] = {}
FUSED_ROWS_DEFAULT = 0


def fused_rows(shape: ModelShape) -> int:
    """Rows up to which a forward takes the fused kernels (SINKSERVE_FUSED_ROWS overrides)."""
    override = os.environ.get("SINKSERVE_FUSED_ROWS")
    if override is not None:
        return int(override)
    return FUSED_ROWS.get(shape.hidden_size, FUSED_ROWS_DEFAULT)


@dataclass(frozen=True)
class LinearConfig:
    block_m: int  # rows per program (>= 16: tl.dot's smallest M)
    block_n: int  # columns per program (per half of the pair)
    block_k: int
    num_warps: int
    num_stages: int


# Sweeps set overrides per kind ("qkv", "gate_up", "o_proj", "down"): {field: value}.
CONFIG_OVERRIDE: dict[str, dict] = {}


def linear_config(kind: str, rows: int, columns: int, depth: int) -> LinearConfig:
    """Launch shape for `rows` rows, `columns` output columns (pairs counted once), K = `depth`.

    Few rows: the weights are the data, so columns are split thin enough that the programs
    cover the SMs (each streams its own columns once); more rows: larger row blocks, so the
    weights are not re-read per row block more than needed.
    """
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 16 if columns <= 4096 else 32
    if kind == "qkv":
        block_n = min(block_n, columns)
    block_k = 128 if depth >= 128 else triton.next_power_of_2(depth)
    config = {
        "block_m": block_m,
        "block_n": block_n,
        "block_k": block_k,
        "num_warps": 4,
        "num_stages": 3,
    }
    config.update(CONFIG_OVERRIDE.get(kind, {}))
    return LinearConfig(**config)


# ----------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _inverse_rms(
    x_ptr,
    residual_ptr,
    new_residual_ptr,
    stride_x,
    stride_residual,
    stride_new_residual,
    rows,  # [BLOCK_M] int64
    row_ok,  # [BLOCK_M]
    write_residual,  # scalar: this program stores the new residual
    eps,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Pass 1 of the norm: 1 / rms of each row of (residual + x), the sum rounded as the reference
    rounds it; one program per row block also stores that sum (the new residual stream)."""
    act_dtype: tl.constexpr = x_ptr.dtype.element_ty
    sum_sq = tl.zeros([rows.shape[0]], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(
                residual_ptr + rows[:, None] * stride_residual + offs_k[None, :],
                mask=mask,
                other=0.0,
            )
            summed = round_to(x + r.to(tl.float32), act_dtype, INTERPRETER)
            tl.store(
                new_residual_ptr + rows[:, None] * stride_new_residual + offs_k[None, :],
                summed,
                mask=mask & write_residual,
            )
            x = summed.to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    return tl.math.rsqrt(sum_sq / K + eps)


@triton.jit
def _normed_tile(
    x_ptr,
    residual_ptr,
    norm_weight_ptr,
    stride_x,
    stride_residual,
    rows,
    row_ok,
    inv_rms,
    k0,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Pass 2: columns [k0, k0 + BLOCK_K) of weight * normalise(residual + x) [BLOCK_M, BLOCK_K],
    in the activation dtype, rounded twice as reference.add_rms_norm rounds."""
    act_dtype: tl.constexpr = x_ptr.dtype.element_ty
    offs_k = k0 + tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    mask = row_ok[:, None] & in_k[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(
            residual_ptr + rows[:, None] * stride_residual + offs_k[None, :], mask=mask, other=0.0
        )
        x = round_to(x + r.to(tl.float32), act_dtype, INTERPRETER).to(tl.float32)
    normalised = round_to(x * inv_rms[:, None], act_dtype, INTERPRETER).to(tl.float32)
    weight = tl.load(norm_weight_ptr + offs_k, mask=in_k, other=0.0).to(tl.float32)
    return round_to(weight[None, :] * normalised, act_dtype, INTERPRETER)


@triton.jit
def _weight_tile(w_ptr, stride_w, cols, col_ok, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[cols, k0:k0 + BLOCK_K] as [BLOCK_N, BLOCK_K] (rows of an nn.Linear weight [N, K])."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(
        w_ptr + cols[:, None].to(tl.int64) * stride_w + offs_k[None, :],
        mask=col_ok[:, None] & (offs_k < K)[None, :],
        other=0.0,
    )


@triton.jit
def _norm_pair_matmul(
    x_ptr,
    residual_ptr,
    new_residual_ptr,
    norm_weight_ptr,
    w_ptr,
    stride_x,
    stride_residual,
    stride_new_residual,
    stride_w,
    rows,
    row_ok,
    lo_cols,  # [BLOCK_N] weight rows of the low block
    hi_cols,  # [BLOCK_N] weight rows of the high block
    col_ok,
    write_residual,
    eps,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """norm(residual + x) @ W[lo_cols]^T and @ W[hi_cols]^T: two [BLOCK_M, BLOCK_N] fp32 tiles."""
    inv_rms = _inverse_rms(
        x_ptr, residual_ptr, new_residual_ptr, stride_x, stride_residual, stride_new_residual,
        rows, row_ok, write_residual, eps, K, BLOCK_K, HAS_RESIDUAL, INTERPRETER,
    )  # fmt: skip
    acc_lo = tl.zeros([rows.shape[0], lo_cols.shape[0]], tl.float32)
    acc_hi = tl.zeros([rows.shape[0], lo_cols.shape[0]], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _normed_tile(
            x_ptr, residual_ptr, norm_weight_ptr, stride_x, stride_residual, rows, row_ok,
            inv_rms, k0, K, BLOCK_K, HAS_RESIDUAL, INTERPRETER,
        )  # fmt: skip
        w_lo = _weight_tile(w_ptr, stride_w, lo_cols, col_ok, k0, K, BLOCK_K)
        w_hi = _weight_tile(w_ptr, stride_w, hi_cols, col_ok, k0, K, BLOCK_K)
        acc_lo += dot_f32(a, tl.trans(w_lo), INTERPRETER)
        acc_hi += dot_f32(a, tl.trans(w_hi), INTERPRETER)
    return acc_lo, acc_hi


# ----------------------------------------------------------------------------------------------
# norm_qkv_rope


@triton.jit
def _rotate_tile(lo, hi, cos_ptr, sin_ptr, stride_cos, stride_sin, rows, mask, offs_j, HALF):
    """Rotate-half on [BLOCK_M, BLOCK_N] half tiles with per-row cos/sin (float32)."""
    cos_row = cos_ptr + rows[:, None] * stride_cos + offs_j[None, :]
    sin_row = sin_ptr + rows[:, None] * stride_sin + offs_j[None, :]
    cos_lo = tl.load(cos_row, mask=mask, other=0.0)
    cos_hi = tl.load(cos_row + HALF, mask=mask, other=0.0)
    sin_lo = tl.load(sin_row, mask=mask, other=0.0)
    sin_hi = tl.load(sin_row + HALF, mask=mask, other=0.0)
    return lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi


@triton.jit
def _norm_qkv_rope_kernel(
    x_ptr,
    residual_ptr,
    new_residual_ptr,
    norm_weight_ptr,
    w_ptr,
    bias_ptr,
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
    tokens,
    eps,
    stride_x,
    stride_residual,
    stride_new_residual,
    stride_w,
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
    stride_q_tok,
    stride_q_sink_tok,
    K: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SUB: tl.constexpr,  # column blocks per half head
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    QUANT: tl.constexpr,
    INTERPRETER: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (head, column block of its half, row block): q, k or v of these rows for that head."""
    gdc_enter(PDL)
    HALF: tl.constexpr = HEAD_DIM // 2
    act_dtype: tl.constexpr = x_ptr.dtype.element_ty
    block = tl.program_id(0)
    head = block // SUB
    offs_j = (block % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)  # index within the half head
    col_ok = offs_j < HALF
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    lo_cols = head * HEAD_DIM + offs_j
    hi_cols = lo_cols + HALF
    lo, hi = _norm_pair_matmul(
        x_ptr, residual_ptr, new_residual_ptr, norm_weight_ptr, w_ptr,
        stride_x, stride_residual, stride_new_residual, stride_w,
        rows, row_ok, lo_cols, hi_cols, col_ok, block == 0, eps,
        K, BLOCK_K, HAS_RESIDUAL, INTERPRETER,
    )  # fmt: skip
    if HAS_BIAS:
        lo += tl.load(bias_ptr + lo_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        hi += tl.load(bias_ptr + hi_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # The qkv projection's output, rounded as F.linear returns it.
    lo = round_to(lo, act_dtype, INTERPRETER).to(tl.float32)
    hi = round_to(hi, act_dtype, INTERPRETER).to(tl.float32)
    mask = row_ok[:, None] & col_ok[None, :]

    if head < NUM_HEADS:  # a query head: rotated twice, stored to q and q_sink
        dst = q_ptr + rows[:, None] * stride_q_tok + head * HEAD_DIM + offs_j[None, :]
        r_lo, r_hi = _rotate_tile(lo, hi, cos_ptr, sin_ptr, stride_cos, stride_sin, rows, mask,
                                  offs_j, HALF)  # fmt: skip
        tl.store(dst, round_to(r_lo, act_dtype, INTERPRETER), mask=mask)
        tl.store(dst + HALF, round_to(r_hi, act_dtype, INTERPRETER), mask=mask)
        dst = q_sink_ptr + rows[:, None] * stride_q_sink_tok + head * HEAD_DIM + offs_j[None, :]
        r_lo, r_hi = _rotate_tile(
            lo, hi, sink_cos_ptr, sink_sin_ptr, stride_sink_cos, stride_sink_sin, rows, mask,
            offs_j, HALF,
        )  # fmt: skip
        tl.store(dst, round_to(r_lo, act_dtype, INTERPRETER), mask=mask)
        tl.store(dst + HALF, round_to(r_hi, act_dtype, INTERPRETER), mask=mask)
    else:  # a key or value head: into the arena at (slot, write index)
        slot = tl.load(slots_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        position = tl.load(write_index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        if head < NUM_HEADS + NUM_KV_HEADS:
            r_lo, r_hi = _rotate_tile(lo, hi, cos_ptr, sin_ptr, stride_cos, stride_sin, rows,
                                      mask, offs_j, HALF)  # fmt: skip
            _store_head(
                k_cache_ptr, k_scale_ptr, stride_k_slot, stride_k_head, stride_k_pos,
                stride_ks_slot, stride_ks_head, head - NUM_HEADS, slot, position, row_ok, mask,
                offs_j, round_to(r_lo, act_dtype, INTERPRETER).to(tl.float32),
                round_to(r_hi, act_dtype, INTERPRETER).to(tl.float32),
                HALF, QUANT, INTERPRETER,
            )  # fmt: skip
        else:
            _store_head(
                v_cache_ptr, v_scale_ptr, stride_v_slot, stride_v_head, stride_v_pos,
                stride_vs_slot, stride_vs_head, head - NUM_HEADS - NUM_KV_HEADS, slot, position,
                row_ok, mask, offs_j, lo, hi, HALF, QUANT, INTERPRETER,
            )  # fmt: skip


@triton.jit
def _store_head(
    cache_ptr,
    scale_ptr,
    stride_slot,
    stride_head,
    stride_pos,
    stride_scale_slot,
    stride_scale_head,
    kv_head,
    slot,  # [BLOCK_M] int64
    position,  # [BLOCK_M] int64
    row_ok,
    mask,
    offs_j,
    lo,  # [BLOCK_M, BLOCK_N] float32, rounded to the activation dtype
    hi,
    HALF: tl.constexpr,
    QUANT: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """Store one k or v head's columns of these rows into the arena (fp8: codes and scales; then
    the program holds the whole head, SUB == 1, so it owns the scale)."""
    kv_head = kv_head.to(tl.int64)
    dst = cache_ptr + slot * stride_slot + kv_head * stride_head + position * stride_pos
    dst = dst[:, None] + offs_j[None, :]
    if QUANT:
        amax = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))
        scale = fp8_scale(amax)
        tl.store(
            scale_ptr + slot * stride_scale_slot + kv_head * stride_scale_head + position,
            scale,
            mask=row_ok,
        )
        tl.store(dst, quantize_fp8(lo, scale, INTERPRETER), mask=mask)
        tl.store(dst + HALF, quantize_fp8(hi, scale, INTERPRETER), mask=mask)
    else:
        cache_dtype: tl.constexpr = cache_ptr.dtype.element_ty
        tl.store(dst, round_to(lo, cache_dtype, INTERPRETER), mask=mask)
        tl.store(dst + HALF, round_to(hi, cache_dtype, INTERPRETER), mask=mask)


def norm_qkv_rope(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
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
    config: LinearConfig | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, q_sink, new_residual): reference.norm_qkv_rope in one launch.

    x, residual [T, hidden] (residual None: x starts the stream and is the new residual); weight
    [(H + 2 Hkv) D, hidden] (nn.Linear layout), bias [(H + 2 Hkv) D] or None; the rest as
    reference.rope_store. `out` takes preallocated (q, q_sink, new_residual) (tests poison them).
    """
    tokens, hidden = x.shape
    head_dim = k_cache.shape[-1]
    half = head_dim // 2
    width = (num_heads + 2 * num_kv_heads) * head_dim
    assert weight.shape == (width, hidden) and weight.stride(-1) == 1 and x.stride(-1) == 1
    assert head_dim % 2 == 0 and norm_weight.is_contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "arena rows must be contiguous"
    tables = [t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin, sink_cos, sink_sin)]
    if out is None:
        q = torch.empty((tokens, num_heads, head_dim), device=x.device, dtype=x.dtype)
        q_sink = torch.empty_like(q)
        new_residual = torch.empty_like(x) if residual is not None else x
    else:
        q, q_sink, new_residual = out
        if residual is None:
            new_residual = x
    if tokens == 0:
        return q, q_sink, new_residual
    config = config or linear_config("qkv", tokens, half, hidden)
    block_n = min(config.block_n, triton.next_power_of_2(half))
    quant = k_scale is not None
    if quant:  # one program per head: it computes the head's scale
        block_n = triton.next_power_of_2(half)
    sub = triton.cdiv(half, block_n)
    scales = scale_args(k_scale, v_scale, k_cache)
    grid = ((num_heads + 2 * num_kv_heads) * sub, triton.cdiv(tokens, config.block_m))
    _norm_qkv_rope_kernel[grid](
        x, x if residual is None else residual, new_residual, norm_weight, weight,
        weight if bias is None else bias, *tables, k_cache, v_cache, scales[0], scales[1],
        slots, write_index, q, q_sink,
        tokens, eps,
        x.stride(0), 0 if residual is None else residual.stride(0), new_residual.stride(0),
        weight.stride(0), *(t.stride(0) for t in tables),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *scales[2:], q.stride(0), q_sink.stride(0),
        K=hidden, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, SUB=sub,
        BLOCK_M=config.block_m, BLOCK_N=block_n, BLOCK_K=config.block_k,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, QUANT=quant,
        INTERPRETER=running_interpreted(_norm_qkv_rope_kernel),
        PDL=pdl_enabled(), **pdl_launch(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return q, q_sink, new_residual


# ----------------------------------------------------------------------------------------------
# norm_gate_up_silu


@triton.jit
def _norm_gate_up_silu_kernel(
    x_ptr,
    residual_ptr,
    new_residual_ptr,
    norm_weight_ptr,
    w_ptr,
    out_ptr,
    tokens,
    eps,
    stride_x,
    stride_residual,
    stride_new_residual,
    stride_w,
    stride_out,
    K: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRETER: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (column block, row block): silu(gate) * up for these columns of these rows."""
    gdc_enter(PDL)
    act_dtype: tl.constexpr = out_ptr.dtype.element_ty
    block = tl.program_id(0)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < INTERMEDIATE
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    gate, up = _norm_pair_matmul(
        x_ptr, residual_ptr, new_residual_ptr, norm_weight_ptr, w_ptr,
        stride_x, stride_residual, stride_new_residual, stride_w,
        rows, row_ok, offs_n, offs_n + INTERMEDIATE, col_ok, block == 0, eps,
        K, BLOCK_K, HAS_RESIDUAL, INTERPRETER,
    )  # fmt: skip
    gate = round_to(gate, act_dtype, INTERPRETER).to(tl.float32)
    up = round_to(up, act_dtype, INTERPRETER).to(tl.float32)
    silu = round_to(tl.div_rn(gate, 1.0 + tl.exp(-gate)), act_dtype, INTERPRETER)
    out = round_to(silu.to(tl.float32) * up, act_dtype, INTERPRETER)
    tl.store(
        out_ptr + rows[:, None] * stride_out + offs_n[None, :],
        out,
        mask=row_ok[:, None] & col_ok[None, :],
    )


def norm_gate_up_silu(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    *,
    config: LinearConfig | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(gate) * up [T, I], new_residual): reference.norm_gate_up_silu in one launch.

    weight [2 I, hidden] (gate rows, then up rows). `out` takes preallocated outputs.
    """
    tokens, hidden = x.shape
    intermediate = weight.shape[0] // 2
    assert weight.shape == (2 * intermediate, hidden) and weight.stride(-1) == 1
    assert x.stride(-1) == 1 and norm_weight.is_contiguous()
    if out is None:
        h = torch.empty((tokens, intermediate), device=x.device, dtype=x.dtype)
        new_residual = torch.empty_like(x) if residual is not None else x
    else:
        h, new_residual = out
        if residual is None:
            new_residual = x
    if tokens == 0:
        return h, new_residual
    config = config or linear_config("gate_up", tokens, intermediate, hidden)
    grid = (triton.cdiv(intermediate, config.block_n), triton.cdiv(tokens, config.block_m))
    _norm_gate_up_silu_kernel[grid](
        x, x if residual is None else residual, new_residual, norm_weight, weight, h,
        tokens, eps,
        x.stride(0), 0 if residual is None else residual.stride(0), new_residual.stride(0),
        weight.stride(0), h.stride(0),
        K=hidden, INTERMEDIATE=intermediate,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        HAS_RESIDUAL=residual is not None,
        INTERPRETER=running_interpreted(_norm_gate_up_silu_kernel),
        PDL=pdl_enabled(), **pdl_launch(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return h, new_residual


# ----------------------------------------------------------------------------------------------
# linear (o_proj with the attention merge, down)


@triton.jit
def _merged_head_tile(
    part_out_ptr,
    part_lse_ptr,
    seen_ptr,
    rows,
    row_ok,
    head,
    capacity,
    sink_end,
    split_len,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """The attention output of one head for a row block [BLOCK_M, HEAD_DIM] float32, merged from
    its split partials as triton_decode's merge kernel merges them."""
    n_valid = tl.minimum(tl.load(seen_ptr + rows, mask=row_ok, other=1), capacity).to(tl.int32)
    n_active = tl.maximum(tl.cdiv(tl.maximum(n_valid - sink_end, 0), split_len), 1)  # [BLOCK_M]
    offs_s = tl.arange(0, SPLITS_PAD)
    base = (rows * HEADS + head) * NUM_SPLITS  # [BLOCK_M]
    active = (offs_s[None, :] < n_active[:, None]) & row_ok[:, None]
    lse = tl.load(part_lse_ptr + base[:, None] + offs_s[None, :], mask=active, other=float("-inf"))
    lse_max = tl.max(lse, axis=1)
    lse_max = tl.where(row_ok, lse_max, 0.0)
    total = tl.sum(tl.exp2(lse - lse_max[:, None]), axis=1)
    total = tl.where(row_ok, total, 1.0)
    offs_d = tl.arange(0, HEAD_DIM)
    merged = tl.zeros([rows.shape[0], HEAD_DIM], tl.float32)
    for split in range(NUM_SPLITS):
        ok = (split < n_active) & row_ok
        lse_s = tl.load(part_lse_ptr + base + split, mask=ok, other=float("-inf"))
        weight = tl.exp2(lse_s - lse_max) / total  # [BLOCK_M]
        part = tl.load(
            part_out_ptr + (base + split)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=ok[:, None],
            other=0.0,
        )
        merged += weight[:, None] * part
    return merged


@triton.jit
def _linear_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    part_lse_ptr,
    seen_ptr,
    tokens,
    capacity,
    sink_end,
    split_len,
    stride_a,
    stride_w,
    stride_out,
    N: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MERGE: tl.constexpr,
    HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    INTERPRETER: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (column block, row block) of a @ W^T; with MERGE, a is attention split partials and
    each K tile is one head (BLOCK_K = head_dim), merged on the way in."""
    gdc_enter(PDL)
    act_dtype: tl.constexpr = out_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if MERGE:
            a = _merged_head_tile(
                a_ptr, part_lse_ptr, seen_ptr, rows, row_ok, k0 // BLOCK_K,
                capacity, sink_end, split_len, HEADS, BLOCK_K, NUM_SPLITS, SPLITS_PAD,
            )  # fmt: skip
            a = round_to(a, act_dtype, INTERPRETER)  # as the merge kernel stores it
        else:
            a = tl.load(
                a_ptr + rows[:, None] * stride_a + offs_k[None, :],
                mask=row_ok[:, None] & (offs_k < K)[None, :],
                other=0.0,
            )
        w = _weight_tile(w_ptr, stride_w, offs_n, col_ok, k0, K, BLOCK_K)
        acc += dot_f32(a, tl.trans(w), INTERPRETER)
    tl.store(
        out_ptr + rows[:, None] * stride_out + offs_n[None, :],
        round_to(acc, act_dtype, INTERPRETER),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def linear(
    a: torch.Tensor | DecodePartials,
    weight: torch.Tensor,
    *,
    kind: str = "down",
    dtype: torch.dtype | None = None,
    config: LinearConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """a @ weight^T [T, N] (no bias), a [T, K] or the unmerged partials of a decode attention
    launch (K = H * D, merged per head first; then `dtype` is the activation dtype)."""
    n, k = weight.shape
    assert weight.stride(-1) == 1
    merge = isinstance(a, DecodePartials)
    if merge:
        tokens, heads, head_dim = a.shape
        assert heads * head_dim == k and dtype is not None
        a_ptr, lse, seen = a.out, a.lse, a.seen
    else:
        tokens = a.shape[0]
        assert a.shape[1] == k and a.stride(-1) == 1
        dtype, a_ptr, lse, seen, heads = a.dtype, a, a, a, 1
    if out is None:
        out = torch.empty((tokens, n), device=weight.device, dtype=dtype)
    if tokens == 0:
        return out
    config = config or linear_config(kind, tokens, n, k)
    block_k = head_dim if merge else config.block_k
    _linear_kernel[(triton.cdiv(n, config.block_n), triton.cdiv(tokens, config.block_m))](
        a_ptr, weight, out, lse, seen,
        tokens,
        a.capacity if merge else 0, a.sink_end if merge else 0, a.split_len if merge else 1,
        0 if merge else a.stride(0), weight.stride(0), out.stride(0),
        N=n, K=k, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
        MERGE=merge, HEADS=heads, NUM_SPLITS=a.num_splits if merge else 1,
        SPLITS_PAD=triton.next_power_of_2(a.num_splits) if merge else 1,
        INTERPRETER=running_interpreted(_linear_kernel),
        PDL=pdl_enabled(), **pdl_launch(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
