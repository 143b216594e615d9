"""Sampling draws from exactly the distribution asked for, reproducibly per (seed, position)."""

from __future__ import annotations

import pytest
import torch

from sinkcache.core.ops.triton_sampling import nucleus_threshold
from sinkcache.core.sampling import SamplerVariant, SlotSampler, draw_nucleus, row_uniform
from sinkcache.inputs import GenerationParams

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
            if method == "threshold":
                # Every row is the same distribution: one row's threshold (the interpreter runs
                # the kernel a row at a time) serves the whole batch.
                k_limit, top_p = sampler._limits(slots[:1], VOCAB)
                tau = nucleus_threshold(probs[:1], top_p, k_limit).expand(batch)
                tokens = draw_nucleus(probs, tau, sampler.seed[slots], position)
            else:
                greedy = rows.argmax(-1)
                tokens = sampler._nucleus_rejection(
                    probs, slots, sampler.seed[slots], position, greedy
                )
        counts += torch.bincount(tokens, minlength=VOCAB).double()
    return counts / DRAWS


@pytest.mark.parametrize("method", ["threshold", "rejection"])
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


def nucleus_by_rule(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Brute force: a token is kept when fewer than top_k tokens and less than top_p of the mass
    lie strictly above it."""
    above = probs[:, None, :] > probs[:, :, None]  # [B, token, other]
    count = above.sum(-1)
    mass = (probs[:, None, :] * above).sum(-1)
    return (count < top_k[:, None]) & (mass < top_p[:, None])


def test_nucleus_threshold_kernel_finds_exactly_the_nucleus() -> None:
    """Rows flat and peaked, top-k and top-p binding or not, ties, zeros, a vocabulary that is not
    a multiple of the tile: the kept set {p >= tau} equals the rule's, token for token."""
    generator = torch.Generator().manual_seed(5)
    vocab = 300
    scales = torch.tensor([0.05, 1.0, 3.0, 12.0, 1.0, 2.0, 1.0, 40.0])
    probs = (torch.randn(8, vocab, generator=generator) * scales[:, None]).softmax(-1)
    probs[6, :50] = probs[6, 50]  # a tie group
    probs[7] = torch.zeros(vocab).index_fill(0, torch.tensor([3, 7, 9]), 1 / 3)  # zeros, ties
    top_p = torch.tensor([0.95, 0.5, 0.9, 0.99, 1.0, 0.3, 0.6, 0.5])
    top_k = torch.tensor([vocab, vocab, 10, vocab, vocab, 1, vocab, vocab])
    tau = nucleus_threshold(probs, top_p, top_k, block=128)
    kept = probs >= tau[:, None]
    assert torch.equal(kept, nucleus_by_rule(probs, top_p, top_k))
    assert kept.sum(-1).tolist()[5] == 1 and kept.sum(-1).tolist()[2] == 10
    assert (kept.sum(-1) >= 1).all() and kept.sum(-1)[0] > 250  # a flat row keeps most
