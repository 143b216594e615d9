"""Choose the kernels for a device: Triton on CUDA, PyTorch elsewhere.

A backend is every device-specific function the model's forward calls: attention over arena slots
and the fused element-wise ops around the matmuls (sinkcache.core.ops).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sinkcache.config import ModelShape
from sinkcache.core.attention import reference
from sinkcache.core.ops import reference as ops_reference


def _no_fused_rows(shape: ModelShape) -> int:
    return 0


@dataclass(frozen=True)
class AttentionBackend:
    """Functions with the signatures of sinkcache.core.attention.reference (decode, prefill) and
    sinkcache.core.ops.reference (add_rms_norm, rope_store, silu_mul; the whole-layer pieces
    norm_qkv_rope, norm_gate_up_silu and linear; decode_prep).

    `decode_partials` is decode that may leave split partials for `linear` to merge (the
    reference returns merged outputs); a forward of at most `fused_rows(shape)` tokens runs its
    layers through the whole-layer pieces (model.py)."""

    name: str
    decode: Callable[..., torch.Tensor]
    prefill: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope_store: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[..., torch.Tensor]
    norm_qkv_rope: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    norm_gate_up_silu: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    linear: Callable[..., torch.Tensor]
    decode_partials: Callable[..., Any]
    decode_prep: Callable[..., tuple[torch.Tensor, ...]]
    fused_rows: Callable[[ModelShape], int] = _no_fused_rows


REFERENCE = AttentionBackend(
    "reference",
    decode=reference.decode_attention,
    prefill=reference.prefill_attention,
    add_rms_norm=ops_reference.add_rms_norm,
    rope_store=ops_reference.rope_store,
    silu_mul=ops_reference.silu_mul,
    norm_qkv_rope=ops_reference.norm_qkv_rope,
    norm_gate_up_silu=ops_reference.norm_gate_up_silu,
    linear=ops_reference.linear,
    decode_partials=reference.decode_attention,
    decode_prep=ops_reference.decode_prep,
)


def triton_backend() -> AttentionBackend:
    from sinkcache.core.attention import triton_decode, triton_prefill
    from sinkcache.core.ops import triton_fused, triton_linear

    return AttentionBackend(
        "triton",
        decode=triton_decode.decode_attention,
        prefill=triton_prefill.prefill_attention,
        add_rms_norm=triton_fused.add_rms_norm,
        rope_store=triton_fused.rope_store,
        silu_mul=triton_fused.silu_mul,
        norm_qkv_rope=triton_linear.norm_qkv_rope,
        norm_gate_up_silu=triton_linear.norm_gate_up_silu,
        linear=triton_linear.linear,
        decode_partials=functools.partial(triton_decode.decode_attention, merge=False),
        decode_prep=triton_fused.decode_prep,
        fused_rows=triton_linear.fused_rows,
    )


def select_backend(device: torch.device | str, name: str = "auto") -> AttentionBackend:
    """`auto`: Triton on CUDA, reference otherwise. `reference` / `triton` force one."""
    device = torch.device(device)
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return REFERENCE
    if name in ("auto", "triton"):
        return triton_backend()
    raise ValueError(f"unknown attention backend {name!r} (auto, reference, triton)")
