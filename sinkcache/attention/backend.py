"""Choose the attention implementation for a device: Triton kernels on CUDA, PyTorch elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sinkcache.attention import reference


@dataclass(frozen=True)
class AttentionBackend:
    """A pair of functions with the signatures of sinkcache.attention.reference."""

    name: str
    decode: Callable[..., torch.Tensor]
    prefill: Callable[..., torch.Tensor]


REFERENCE = AttentionBackend("reference", reference.decode_attention, reference.prefill_attention)


def triton_backend() -> AttentionBackend:
    from sinkcache.attention import triton_decode, triton_prefill

    return AttentionBackend(
        "triton", triton_decode.decode_attention, triton_prefill.prefill_attention
    )


def select_backend(device: torch.device | str, name: str = "auto") -> AttentionBackend:
    """`auto`: Triton on CUDA, reference otherwise. `reference` / `triton` force one."""
    device = torch.device(device)
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return REFERENCE
    if name in ("auto", "triton"):
        return triton_backend()
    raise ValueError(f"unknown attention backend {name!r} (auto, reference, triton)")
