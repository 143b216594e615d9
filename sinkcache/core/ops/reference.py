"""Fused decoder ops in plain PyTorch: exactly what the model computed op by op before fusion.

These are the CPU path and the definition the Triton kernels (triton_fused.py) are tested against.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from sinkcache.core.rope import apply_rotary


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k, write k and v into the arena, return (q, q_sink), each [T, H, D].

    qkv [T, (H + 2 Hkv) D] (q heads, then k heads, then v heads); cos/sin and sink_cos/sink_sin
    [T, D] float32; k_cache/v_cache [N, Hkv, C, D]; token t goes to [slots[t], :, write_index[t]].
    q is rotated by (cos, sin) and also, as q_sink, by (sink_cos, sink_sin); k by (cos, sin).
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
    k_cache[slots, :, write_index] = k.to(k_cache.dtype)
    v_cache[slots, :, write_index] = v.to(v_cache.dtype)
    return q, q_sink


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
