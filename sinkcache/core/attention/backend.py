"""Choose the kernels for a device: Triton on CUDA, PyTorch elsewhere.

A backend is every device-specific function the model's forward calls: attention over arena slots
and the fused element-wise ops around the matmuls (sinkcache.core.ops); and decode_prep, the decode
batch set-up the runner calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sinkcache.core.attention import reference
from sinkcache.core.ops import reference as ops_reference


@dataclass(frozen=True)
class AttentionBackend:
    """Functions with the signatures of sinkcache.core.attention.reference (decode, prefill) and
    sinkcache.core.ops.reference (add_rms_norm, rope_store, silu_mul, decode_prep)."""

    name: str
    decode: Callable[..., torch.Tensor]
    prefill: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope_store: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[..., torch.Tensor]
    decode_prep: Callable[..., tuple[torch.Tensor, ...]]


REFERENCE = AttentionBackend(
    "reference",
    decode=reference.decode_attention,
    prefill=reference.prefill_attention,
    add_rms_norm=ops_reference.add_rms_norm,
    rope_store=ops_reference.rope_store,
    silu_mul=ops_reference.silu_mul,
    decode_prep=ops_reference.decode_prep,
)


def triton_backend() -> AttentionBackend:
    from sinkcache.core.attention import triton_decode, triton_prefill
    from sinkcache.core.ops import triton_fused

    return AttentionBackend(
        "triton",
        decode=triton_decode.decode_attention,
        prefill=triton_prefill.prefill_attention,
        add_rms_norm=triton_fused.add_rms_norm,
        rope_store=triton_fused.rope_store,
        silu_mul=triton_fused.silu_mul,
        decode_prep=triton_fused.decode_prep,
    )


def triton_supports_head_dim(head_dim: int) -> bool:
    """The Triton attention kernels tile a head in one power-of-two block of at least 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def select_backend(
    device: torch.device | str, name: str = "auto", head_dim: int | None = None
) -> AttentionBackend:
    """`auto`: Triton on CUDA, reference otherwise. `reference` / `triton` force one. With the
    model's `head_dim`, a head the Triton kernels cannot tile is refused here, before any step."""
    device = torch.device(device)
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return REFERENCE
    if name in ("auto", "triton"):
        if head_dim is not None and not triton_supports_head_dim(head_dim):
            raise ValueError(
                f"the Triton attention kernels need a head_dim that is a power of two >= 16, this "
                f"model's is {head_dim}: run it with --attention reference"
            )
        return triton_backend()
    raise ValueError(f"unknown attention backend {name!r} (auto, reference, triton)")
