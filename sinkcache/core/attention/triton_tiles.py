"""Triton building blocks shared by the attention kernels and the fused ops.

- `load_kv_tile`: one tile of keys and values of one (slot, kv_head) out of the arena, with the
  per-position scales of an fp8 arena: the one place both attention kernels read the cache.
- `quantize_fp8`: what the store side does for an fp8 arena (a scale per token and head).
- interpreter workarounds (Triton 3.6 on CPU, the test path), selected by INTERPRETER:
  - tensor loop bounds fail under numpy >= 2.4 (triton-lang/triton#9171), so loops run a fixed
    trip count from the host (MAX_TILES) and the tiles past the data are fully masked (`tile_count`);
  - its tl.dot multiplies bf16 operands as raw uint16 bits, so operands are upcast to fp32 first,
    which is exact: bf16 values are fp32 values and the GPU accumulates in fp32 too (`dot_f32`);
  - its float32 -> float8 cast truncates and does not saturate where the GPU rounds to nearest
    even and saturates, so under INTERPRETER the rounding is done by hand (`_fp8e4m3_rne`).

The fp8 arena format (`kv_dtype="fp8_e4m3"`): each stored head vector x [D] (a key after rotation,
or a value) keeps e4m3 codes x / s and one float32 scale s = max|x| / 448 (448 is e4m3's largest
finite value), so every token and head uses the format's whole range. Attention never dequantises
a tile: q . (s_j k_j) = s_j (q . k_j) scales a score column, and sum_j p_j s_j v_j scales the
probabilities before the PV product.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from sinkcache.core.arena import FP8_MAX, FP8_MIN_SCALE_AMAX

LOG2E = 1.4426950408889634
_FP8_MAX = tl.constexpr(FP8_MAX)
_FP8_MIN_SCALE_AMAX = tl.constexpr(FP8_MIN_SCALE_AMAX)


# Programmatic dependent launch (Hopper): a kernel launched with it may start while the kernel
# before it in the stream finishes; it waits (griddepcontrol.wait) before touching anything that
# kernel wrote, so only its launch latency overlaps. Off unless SINKSERVE_PDL=1 / set_pdl(True):
# on the H200 it gained 1-6% on the whole-layer kernels and nothing on the default path
# (bench/engine_bench.py --variants ...+pdl; docs/BENCHMARKS.md, section 7).
_pdl = os.environ.get("SINKSERVE_PDL", "0") == "1"


def set_pdl(enabled: bool) -> None:
    global _pdl
    _pdl = enabled


def pdl_enabled() -> bool:
    return _pdl and os.environ.get("TRITON_INTERPRET", "0") != "1"


def pdl_launch() -> dict:
    """Launch options to pass with PDL=pdl_enabled() (the two must agree)."""
    return {"launch_pdl": True} if pdl_enabled() else {}


@triton.jit
def gdc_enter(PDL: tl.constexpr):
    """First statement of every kernel launched with pdl_launch(): wait for the kernel before to
    finish (its writes visible), then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def running_interpreted(kernel) -> bool:
    """True when Triton's interpreter runs `kernel` (TRITON_INTERPRET=1 when triton was imported)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


@triton.jit
def tile_count(length, BLOCK_N: tl.constexpr, INTERPRETER: tl.constexpr, MAX_TILES: tl.constexpr):
    """Trip count of a loop over `length` positions in tiles of BLOCK_N.

    Call it inside `range(...)`: the interpreter turns every assigned value into a tensor.
    """
    if INTERPRETER:
        return MAX_TILES
    else:
        return tl.cdiv(tl.maximum(length, 0), BLOCK_N)


@triton.jit
def dot_f32(a, b, INTERPRETER: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands stay fp32 (no tf32)."""
    if INTERPRETER:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def load_kv_tile(
    k_base,
    v_base,
    k_scale_base,
    v_scale_base,
    stride_k_pos,
    stride_v_pos,
    pos,  # [BLOCK_N] int32 positions in the slot
    in_range,  # [BLOCK_N] which of them to read (the others come back as 0)
    HEAD_DIM: tl.constexpr,
    QUANT: tl.constexpr,
):
    """K and V [BLOCK_N, HEAD_DIM] of one (slot, kv_head) at `pos`, as stored, and their scales
    [BLOCK_N] float32 (an fp8 arena; 1 otherwise, unused). Bases point at position 0 of the
    (slot, kv_head); scale rows are contiguous along positions."""
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(
        k_base + pos[:, None] * stride_k_pos + offs_d[None, :], mask=in_range[:, None], other=0.0
    )
    v = tl.load(
        v_base + pos[:, None] * stride_v_pos + offs_d[None, :], mask=in_range[:, None], other=0.0
    )
    if QUANT:
        k_scale = tl.load(k_scale_base + pos, mask=in_range, other=0.0)
        v_scale = tl.load(v_scale_base + pos, mask=in_range, other=0.0)
    else:
        k_scale = tl.full(pos.shape, 1.0, tl.float32)
        v_scale = k_scale
    return k, v, k_scale, v_scale


@triton.jit
def _fp8e4m3_rne(x):
    """float32 (|x| <= 448) -> float8_e4m3fn, round to nearest even, as cvt.rn.satfinite does."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(x)
    abits = a.to(tl.uint32, bitcast=True)
    # Normal range: keep 3 of the 23 mantissa bits (ties to even), re-bias the exponent 127 -> 7.
    rounded = (abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20
    normal = rounded.to(tl.int32) - (120 << 3)
    # Below 2^-6 e4m3 is subnormal: multiples of 2^-9, ties to even.
    scaled = a * 512.0
    whole = tl.floor(scaled)
    frac = scaled - whole
    whole_i = whole.to(tl.int32)
    up = (frac > 0.5) | ((frac == 0.5) & ((whole_i & 1) == 1))
    subnormal = whole_i + up.to(tl.int32)
    code = tl.where(a < 0.015625, subnormal, tl.minimum(normal, 126))
    return (code.to(tl.uint32) | sign).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def to_fp8(x, INTERPRETER: tl.constexpr):
    """float32 -> float8_e4m3fn, round to nearest even, saturating."""
    if INTERPRETER:
        return _fp8e4m3_rne(tl.minimum(tl.maximum(x, -_FP8_MAX), _FP8_MAX))
    else:
        return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def fp8_scale(amax):
    """The scale of a head vector whose largest magnitude is `amax` (float32)."""
    amax = tl.maximum(amax, _FP8_MIN_SCALE_AMAX)
    return tl.div_rn(amax, tl.full(amax.shape, _FP8_MAX, tl.float32))


@triton.jit
def quantize_fp8(x, scale, INTERPRETER: tl.constexpr):
    """x [ROWS, N] float32 -> e4m3 codes of x / scale (scale [ROWS] float32)."""
    return to_fp8(tl.div_rn(x, tl.broadcast_to(scale[:, None], x.shape)), INTERPRETER)
