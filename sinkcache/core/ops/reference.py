"""Fused decoder ops in plain PyTorch: exactly what the model computed op by op before fusion.

These are the CPU path and the definition the Triton kernels (triton_fused.py, triton_linear.py)
are tested against.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from sinkcache.core.arena import FP8, FP8_MAX, FP8_MIN_SCALE_AMAX
from sinkcache.core.policy import rotary_position, sink_query_position, write_index
from sinkcache.core.rope import apply_rotary, rotary_cos_sin


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) with new_residual = residual + x (x alone on the first layer).

    x, residual [T, hidden]; weight [hidden]. As transformers' LlamaRMSNorm: normalise in float32,
    cast back to the input dtype, then multiply by the weight.
    """
    new_residual = x if residual is None else residual + x
    x32 = new_residual.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(new_residual.dtype), new_residual


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k, write k and v into the arena, return (q, q_sink), each [T, H, D].

    qkv [T, (H + 2 Hkv) D] (q heads, then k heads, then v heads); cos/sin and sink_cos/sink_sin
    [T, D] float32; k_cache/v_cache [N, Hkv, C, D]; token t goes to [slots[t], :, write_index[t]].
    q is rotated by (cos, sin) and also, as q_sink, by (sink_cos, sink_sin); k by (cos, sin).
    An fp8 arena (k_scale/v_scale [N, Hkv, C] float32 given) stores each k and v head as e4m3
    codes with its own scale (`quantize_fp8`).
    """
    tokens, head_dim = qkv.shape[0], k_cache.shape[-1]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
    q = q.view(tokens, num_heads, head_dim)
    k = k.view(tokens, num_kv_heads, head_dim)
    v = v.view(tokens, num_kv_heads, head_dim)
    q_sink = apply_rotary(q, sink_cos, sink_sin)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    if k_scale is None:
        k_cache[slots, :, write_index] = k.to(k_cache.dtype)
        v_cache[slots, :, write_index] = v.to(v_cache.dtype)
    else:
        k_codes, k_scale[slots, :, write_index] = quantize_fp8(k)
        v_codes, v_scale[slots, :, write_index] = quantize_fp8(v)
        k_cache[slots, :, write_index] = k_codes
        v_cache[slots, :, write_index] = v_codes
    return q, q_sink


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 codes [..., D], float32 scales [...]): scale = max|x| / 448 per vector,
    codes = x / scale rounded to nearest even (|x / scale| <= 448, so nothing saturates)."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1).clamp_min(FP8_MIN_SCALE_AMAX) / FP8_MAX
    return (x32 / scale[..., None]).to(FP8), scale


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------
# whole small-batch layer pieces (sinkcache.core.ops.triton_linear does each in one launch)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """add_rms_norm, the qkv projection, then rope_store: (q, q_sink, new_residual)."""
    normed, new_residual = add_rms_norm(x, residual, norm_weight, eps)
    q, q_sink = rope_store(
        F.linear(normed, weight, bias), cos, sin, sink_cos, sink_sin, k_cache, v_cache, slots,
        write_index, num_heads, num_kv_heads, k_scale, v_scale,
    )  # fmt: skip
    return q, q_sink, new_residual


def norm_gate_up_silu(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm, the gate/up projection, then silu_mul: (silu(gate) * up, new_residual)."""
    normed, new_residual = add_rms_norm(x, residual, norm_weight, eps)
    return silu_mul(F.linear(normed, weight)), new_residual


def linear(
    a: torch.Tensor, weight: torch.Tensor, *, kind: str = "", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """a [T, K] @ weight^T (nn.Linear without bias)."""
    return F.linear(a, weight)


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
    """What a decode row feeds, from its slot's state (sinkcache.core.policy, rope):

    (token_ids, write_index, seen_after [B] int64, cos, sin, sink_cos, sink_sin [B, D] float32)
    for slots [B]; seen, base, next_token are the arena's per-slot tensors.
    """
    t = seen[slots]
    seen_after = t + 1
    cos, sin = rotary_cos_sin(rotary_position(t, base[slots], sink), inv_freq, scaling)
    sink_pos = sink_query_position(t, seen_after, sink + window)
    sink_cos, sink_sin = rotary_cos_sin(sink_pos, inv_freq, scaling)
    index = write_index(t, sink, window)
    return next_token[slots], index, seen_after, cos, sin, sink_cos, sink_sin
