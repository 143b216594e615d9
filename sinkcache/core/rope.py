"""Rotary position embedding tables, exact at any stream position.

sinkserve keeps keys rotated by their stream position (docs/ARCHITECTURE.md), so a session millions
of tokens in rotates by angles of millions of radians. float32 loses whole radians there, so angles
are formed in float64 and reduced mod 2π before cos/sin; only then do they drop to float32.
"""

from __future__ import annotations

import math

import torch

from sinkcache.config import ModelShape
from sinkcache.families import shape_to_hf_config

TWO_PI = 2.0 * math.pi


def inverse_frequencies(shape: ModelShape) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float64, attention scaling), as transformers defines them."""
    if shape.rope_type == "default":
        dim = shape.head_dim
        inv = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv.double(), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, scaling = ROPE_INIT_FUNCTIONS[shape.rope_type](shape_to_hf_config(shape), "cpu")
    return inv.double(), float(scaling)


class RotaryTable:
    """cos/sin for arbitrary int64 positions on one device."""

    def __init__(self, shape: ModelShape, device: torch.device | str) -> None:
        inv_freq, self.scaling = inverse_frequencies(shape)
        self.inv_freq = inv_freq.to(device)  # [head_dim/2] float64

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> (cos, sin), each [T, head_dim] float32 (halves repeated)."""
        return rotary_cos_sin(positions, self.inv_freq, self.scaling)


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int64, inv_freq [D/2] float64 -> (cos, sin) [T, D] float32 (halves repeated):
    angles in float64, reduced mod 2π, then float32."""
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.remainder(angles, TWO_PI).to(torch.float32)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * scaling, angles.sin() * scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by per-token cos/sin [T, head_dim] (rotate-half layout)."""
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    out = x32 * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype)
