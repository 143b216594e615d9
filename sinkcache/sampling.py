"""Sampling on the device, per request, reproducible under any batching.

Each slot carries its request's parameters in small device tensors, so a batch samples with one set
of tensor ops and no per-session Python. Randomness is counter-based: the noise for a token is a
hash of (seed, stream position, vocab id), so a seeded request produces the same tokens whichever
other sessions share its batch (torch generators cannot give that per row).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class SamplingError(ValueError):
    """Generation parameters out of range."""


@dataclass(frozen=True)
class GenerationParams:
    """What a request asks of one generated reply. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: drawn at random for the request
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self, vocab_size: int) -> None:
        if not 1 <= self.max_new_tokens <= 1_000_000_000:
            raise SamplingError(f"max_new_tokens must be in [1, 1e9], got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0 or self.temperature != self.temperature:
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 <= self.top_k <= vocab_size:
            raise SamplingError(f"top_k must be in [0, {vocab_size}], got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise SamplingError(f"seed must be in [0, 2^63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for stop in self.stop:
            if not 0 < len(stop) <= MAX_STOP_LENGTH:
                raise SamplingError(f"stop strings must be 1..{MAX_STOP_LENGTH} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


class SamplerVariant(enum.IntEnum):
    """What the rows of a batch need; a batch runs the cheapest variant that covers all rows."""

    GREEDY = 0
    SAMPLE = 1  # temperature only
    FILTER = 2  # top-k / top-p

    @staticmethod
    def for_params(params: GenerationParams) -> SamplerVariant:
        if params.greedy:
            return SamplerVariant.GREEDY
        return SamplerVariant.FILTER if params.filtered else SamplerVariant.SAMPLE


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX1 = _signed(0xFF51AFD7ED558CCD)
_MIX2 = _signed(0xC4CEB9FE1A85EC53)
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_LOW31 = (1 << 31) - 1


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0, 1) noise [B, V] from a murmur3 finaliser over (seed, position, vocab id)."""
    vocab = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)
    x = (seed * _GOLDEN + position)[:, None] * _GOLDEN + vocab[None, :]
    x = x ^ _shift_right(x, 33)
    x = x * _MIX1
    x = x ^ _shift_right(x, 33)
    x = x * _MIX2
    x = x ^ _shift_right(x, 33)
    top24 = _shift_right(x, 40).to(torch.float32)
    return (top24 + 0.5) * (1.0 / (1 << 24))


class SlotSampler:
    """Per-slot generation parameters on the device, and the batched sampling function."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.seed = torch.zeros(rows, dtype=torch.int64, device=device)

    def configure(self, slot: int, params: GenerationParams) -> int:
        """Store a request's parameters for its slot; returns the seed actually used."""
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.seed[slot] = seed
        return seed

    def sample(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        position: torch.Tensor,
        variant: SamplerVariant,
    ) -> torch.Tensor:
        """logits [B, V] float32, slots [B], position [B] (stream position of the new token) -> [B]."""
        greedy_tokens = logits.argmax(dim=-1)
        if variant == SamplerVariant.GREEDY:
            return greedy_tokens
        temperature = self.temperature[slots]
        scaled = logits / temperature.clamp_min(1e-6)[:, None]
        if variant == SamplerVariant.FILTER:
            scaled = self._filter(scaled, slots)
        gumbel = -torch.log(-torch.log(uniform_noise(self.seed[slots], position, logits.shape[-1])))
        sampled = (scaled + gumbel).argmax(dim=-1)
        return torch.where(temperature == 0.0, greedy_tokens, sampled)

    def _filter(self, scaled: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Mask logits outside each row's top-k and top-p nucleus with -inf."""
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
        top_k = self.top_k[slots]
        k_limit = torch.where(top_k > 0, top_k, torch.full_like(top_k, scaled.shape[-1]))
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = (rank >= k_limit[:, None]) | (mass_before >= self.top_p[slots][:, None])
        drop[:, 0] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
