"""Sampling draws from exactly the distribution asked for, reproducibly per (seed, position)."""

from __future__ import annotations

import pytest
import torch

from sinkcache.sampling import GenerationParams, SamplerVariant, SlotSampler, row_uniform

VOCAB = 12
DRAWS = 40_000


def expected(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The reference: HF-style top-k then top-p on the temperature-scaled distribution."""
    probs = (logits / temperature).softmax(-1).double()
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for rank, token in enumerate(order.tolist()):
        if (top_k and rank >= top_k) or (rank > 0 and mass >= top_p):
            break
        keep[token] = True
        mass += probs[token].item()
    truncated = probs * keep
    return truncated / truncated.sum()


def frequencies(sampler: SlotSampler, logits: torch.Tensor, variant, method) -> torch.Tensor:
    """Draw DRAWS tokens (one row per stream position) and count them."""
    batch = 4000
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    for start in range(0, DRAWS, batch):
        slots = torch.zeros(batch, dtype=torch.int64)
        position = torch.arange(start, start + batch)
        rows = logits.expand(batch, -1).contiguous()
        if method is None:
            tokens = sampler.sample(rows, slots, position, variant)
        else:
            probs = (rows / sampler.temperature[slots][:, None]).softmax(-1)
            if method == "sorted":
                tokens = sampler._nucleus_sorted(probs, slots, sampler.seed[slots], position)
            else:
                greedy = rows.argmax(-1)
                tokens = sampler._nucleus_rejection(
                    probs, slots, sampler.seed[slots], position, greedy
                )
        counts += torch.bincount(tokens, minlength=VOCAB).double()
    return counts / DRAWS


@pytest.mark.parametrize("method", ["sorted", "rejection"])
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 0.7), (0.7, 5, 1.0), (1.3, 4, 0.8), (1.0, 0, 0.05)]
)
def test_nucleus_paths_draw_the_truncated_distribution(method, temperature, top_k, top_p) -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    sampler = SlotSampler(1, VOCAB, "cpu")
    sampler.configure(
        0, GenerationParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    )
    got = frequencies(sampler, logits, SamplerVariant.FILTER, method)
    want = expected(logits, temperature, top_k, top_p)
    assert (got[want == 0] == 0).all(), "drew a token outside top-k / top-p"
    assert (got - want).abs().max() < 0.012, (got, want)


def test_temperature_only_and_greedy() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(4))
    sampler = SlotSampler(1, VOCAB, "cpu")
    sampler.configure(0, GenerationParams(temperature=0.8, seed=5))
    got = frequencies(sampler, logits, SamplerVariant.SAMPLE, None)
    assert (got - expected(logits, 0.8, 0, 1.0)).abs().max() < 0.012
    sampler.configure(0, GenerationParams(temperature=0.0))
    greedy = frequencies(sampler, logits, SamplerVariant.FILTER, None)
    assert greedy[logits.argmax()] == 1.0


def test_draws_depend_only_on_seed_and_position() -> None:
    seed = torch.tensor([7, 7, 8])
    position = torch.tensor([100, 100, 100])
    u = row_uniform(seed, position)
    assert u[0] == u[1] and u[0] != u[2]
    assert ((u >= 0) & (u < 1)).all()
    spread = row_uniform(torch.full((10_000,), 3), torch.arange(10_000))
    assert abs(spread.mean().item() - 0.5) < 0.01 and spread.std().item() == pytest.approx(
        0.2887, abs=0.01
    )
