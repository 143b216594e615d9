"""Sampling on the device, per request, reproducible under any batching.

Each slot carries its request's parameters in small device tensors, so a batch samples with one set
of tensor ops and no per-session Python. Randomness is counter-based: the noise for a token is a
hash of (seed, stream position, vocab id), so a seeded request produces the same tokens whichever
other sessions share its batch (torch generators cannot give that per row).
"""

from __future__ import annotations

import enum
import random

import torch

from sinkcache.inputs import GenerationParams


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


def row_uniform(seed: torch.Tensor, position: torch.Tensor, draw: int = 0) -> torch.Tensor:
    """One U[0, 1) float64 per row from a murmur3 finaliser over (seed, position, draw)."""
    x = (seed * _GOLDEN + position) * _GOLDEN + draw
    x = x ^ _shift_right(x, 33)
    x = x * _MIX1
    x = x ^ _shift_right(x, 33)
    x = x * _MIX2
    x = x ^ _shift_right(x, 33)
    return _shift_right(x, 11).to(torch.float64) * (1.0 / (1 << 53))


INVERSE_CDF_BLOCK = 256


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of non-negative `weights` [B, V] by its uniform `u` [B].

    Two levels (block sums, then one block) so a draw reads the row once instead of building a
    full cumulative sum. A zero-weight index is never returned.
    """
    batch, vocab = weights.shape
    block = INVERSE_CDF_BLOCK
    pad = (-vocab) % block
    padded = torch.nn.functional.pad(weights, (0, pad)) if pad else weights
    blocks = padded.reshape(batch, -1, block)
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [B, V / block]
    total = block_cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, total * (1 - 1e-12))
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp_max(blocks.shape[1] - 1)
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp_min(0)), 0.0)
    inner = blocks.gather(1, chosen[:, :, None].expand(-1, -1, block))[:, 0].double().cumsum(-1)
    offset = torch.minimum(target - before, inner[:, -1:] * (1 - 1e-12))
    within = torch.searchsorted(inner, offset, right=True).clamp_max(block - 1)
    return (chosen * block + within)[:, 0].clamp_max(vocab - 1)


def draw_nucleus(
    probs: torch.Tensor, threshold: torch.Tensor, seed: torch.Tensor, position: torch.Tensor
) -> torch.Tensor:
    """One draw per row from the tokens at or above the row's threshold (its nucleus)."""
    return inverse_cdf(probs * (probs >= threshold[:, None]), row_uniform(seed, position))


class SlotSampler:
    """Per-slot generation parameters on the device, and the batched sampling function."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self._temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self._top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self._top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self._seed = torch.zeros(rows, dtype=torch.int64, device=device)
        # slot -> (temperature, top_k, top_p, seed) configured since the last `commit`
        self._staged: dict[int, tuple[float, int, float, int]] = {}

    # Per-slot parameters [rows], with every configured slot written.
    @property
    def temperature(self) -> torch.Tensor:
        self.commit()
        return self._temperature

    @property
    def top_k(self) -> torch.Tensor:
        self.commit()
        return self._top_k

    @property
    def top_p(self) -> torch.Tensor:
        self.commit()
        return self._top_p

    @property
    def seed(self) -> torch.Tensor:
        self.commit()
        return self._seed

    def configure(self, slot: int, params: GenerationParams) -> int:
        """Store a request's parameters for its slot (on the device at the next `commit`, in one
        write per tensor for all slots configured meanwhile); returns the seed actually used."""
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        self._staged[slot] = (params.temperature, params.top_k, params.top_p, seed)
        return seed

    def commit(self) -> None:
        """Write the staged parameters (before a step that samples; `sample` does it too)."""
        if not self._staged:
            return
        staged, self._staged = self._staged, {}
        slots = torch.tensor(list(staged), dtype=torch.int64)
        temperature, top_k, top_p, seed = zip(*staged.values(), strict=True)
        for target, values in (
            (self._temperature, temperature),
            (self._top_k, top_k),
            (self._top_p, top_p),
            (self._seed, seed),
        ):
            host = torch.tensor(values, dtype=target.dtype)
            target.index_copy_(0, slots.to(target.device), host.to(target.device))

    def sample(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        position: torch.Tensor,
        variant: SamplerVariant,
    ) -> torch.Tensor:
        """logits [B, V] float32, slots [B], position [B] (stream position of the new token) -> [B].

        Sampling is by inverse CDF with one uniform per row, so no [B, V] noise is made.
        """
        self.commit()
        greedy_tokens = logits.argmax(dim=-1)
        if variant == SamplerVariant.GREEDY:
            return greedy_tokens
        temperature = self.temperature[slots]
        probs = (logits / temperature.clamp_min(1e-6)[:, None]).softmax(dim=-1)
        seed = self.seed[slots]
        if variant == SamplerVariant.SAMPLE:
            sampled = inverse_cdf(probs, row_uniform(seed, position))
        elif probs.is_cuda:
            sampled = self._nucleus_threshold(probs, slots, seed, position)
        else:
            sampled = self._nucleus_rejection(probs, slots, seed, position, greedy_tokens)
        return torch.where(temperature == 0.0, greedy_tokens, sampled)

    def _limits(self, slots: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        top_k = self.top_k[slots]
        return torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)), self.top_p[slots]

    def _nucleus_threshold(self, probs, slots, seed, position) -> torch.Tensor:
        """Top-k / top-p on the GPU: each row's nucleus threshold by a sort-free search (a Triton
        kernel, sinkcache.core.ops.triton_sampling), then one draw. Fixed shapes, no host sync."""
        from sinkcache.core.ops.triton_sampling import nucleus_threshold

        k_limit, top_p = self._limits(slots, probs.shape[-1])
        return draw_nucleus(probs, nucleus_threshold(probs, top_p, k_limit), seed, position)

    def _nucleus_rejection(self, probs, slots, seed, position, greedy, max_draws: int = 64):
        """Top-k / top-p without sorting (the CPU path): draw from the tokens above a pivot and
        accept if the draw is in the nucleus; a rejected draw raises the pivot to its own
        probability, so every later draw comes from a smaller superset of the nucleus. Accepting
        by membership makes the result exactly the nucleus distribution (same rule as the threshold
        path); rows still unaccepted after `max_draws` take the most likely token."""
        vocab = probs.shape[-1]
        k_limit, top_p = self._limits(slots, vocab)
        check_k, check_p = bool((k_limit < vocab).any()), bool((top_p < 1.0).any())
        result = greedy.clone()
        pending = torch.arange(probs.shape[0], device=probs.device)
        pivot = torch.full((probs.shape[0],), -1.0, device=probs.device)
        for draw in range(max_draws):
            rows = probs if draw == 0 else probs[pending]
            weights = rows if draw == 0 else rows * (rows > pivot[pending, None])
            token = inverse_cdf(weights, row_uniform(seed[pending], position[pending], draw))
            p_token = rows.gather(1, token[:, None])
            above = rows > p_token
            accepted = torch.ones_like(token, dtype=torch.bool)
            if check_k:
                accepted &= above.sum(dim=-1) < k_limit[pending]
            if check_p:
                accepted &= rows.masked_fill(~above, 0.0).sum(dim=-1) < top_p[pending]
            result[pending[accepted]] = token[accepted]
            pivot[pending[~accepted]] = p_token[~accepted, 0]
            pending = pending[~accepted]
            if pending.numel() == 0:
                break
        return result
