"""Streaming results equal the reference StreamingLLM semantics, at any stream position."""

from __future__ import annotations

import random

import pytest
import torch

from sinkcache.config import CacheGeometry, ModelShape
from sinkcache.core.arena import KVArena
from sinkcache.core.attention.backend import REFERENCE
from sinkcache.core.plan import PrefillChunk, StepPlan
from sinkcache.core.runner import ModelRunner
from sinkcache.families import shape_to_hf_config
from sinkcache.models.loader import from_hf_model
from tests.streaming_reference import ReferenceStream

SHAPE = ModelShape(
    vocab_size=89,
    hidden_size=48,
    intermediate_size=64,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
)


def _models(seed: int, shape: ModelShape = SHAPE):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(shape_to_hf_config(shape), dtype=torch.float32).eval()
    return hf, from_hf_model(hf, torch.float32, "cpu")


def _run_interleaved(
    hf,
    ours,
    geometry: CacheGeometry,
    num_sessions: int,
    length: int,
    seed: int,
    bases: list[int],
) -> float:
    """Stream `num_sessions` random streams through one arena with a random mix of decode rows and
    prefill chunks per step; returns the worst max-abs logit difference against the reference."""
    rng = random.Random(seed)
    arena = KVArena(ours.shape, geometry, num_sessions + 2, torch.float32, "cpu")
    runner = ModelRunner(ours, arena, REFERENCE)
    streams = [
        [rng.randrange(SHAPE.vocab_size) for _ in range(length)] for _ in range(num_sessions)
    ]
    slots = [arena.allocate(base=bases[i]) for i in range(num_sessions)]
    refs = [ReferenceStream(hf, geometry.sink, geometry.window) for _ in range(num_sessions)]
    fed = [0] * num_sessions
    worst = 0.0
    while any(f < length for f in fed):
        decode_rows, chunks, chunk_rows = [], [], []
        for s in range(num_sessions):
            left = length - fed[s]
            if left == 0 or rng.random() < 0.2:
                continue  # this session sits this step out
            if rng.random() < 0.5:
                decode_rows.append(s)
            else:
                n = rng.randint(1, min(left, geometry.window))
                chunks.append(PrefillChunk(slots[s], streams[s][fed[s] : fed[s] + n], fed[s]))
                chunk_rows.append(s)
        if not decode_rows and not chunks:
            continue
        decode_tokens = [streams[s][fed[s]] for s in decode_rows]
        plan = StepPlan(decode_slots=[slots[s] for s in decode_rows], prefill=chunks)
        logits = runner.forward_logits(plan, decode_tokens=decode_tokens)
        offset = 0
        for s, tok in zip(decode_rows, decode_tokens, strict=True):
            expected = refs[s].feed([tok])
            worst = max(worst, (logits[offset : offset + 1] - expected).abs().max().item())
            fed[s] += 1
            offset += 1
        for s, chunk in zip(chunk_rows, chunks, strict=True):
            n = len(chunk.tokens)
            expected = refs[s].feed(chunk.tokens)
            worst = max(worst, (logits[offset : offset + n] - expected).abs().max().item())
            fed[s] += n
            offset += n
    for s in range(num_sessions):
        assert int(arena.seen[slots[s]]) == length
    return worst


@pytest.mark.parametrize(
    ("sink", "window", "seed"),
    [(4, 12, 1), (1, 7, 2), (0, 9, 3), (3, 16, 4)],
)
def test_interleaved_sessions_match_reference(sink: int, window: int, seed: int) -> None:
    hf, ours = _models(seed)
    geometry = CacheGeometry(sink, window)
    length = 5 * geometry.capacity  # well past 4x capacity: the ring wraps several times
    worst = _run_interleaved(hf, ours, geometry, 4, length, seed, bases=[0, 0, 0, 0])
    assert worst < 1e-4, worst


def test_results_do_not_depend_on_stream_position() -> None:
    """A session whose stream counter starts above 10^9 computes the same logits."""
    hf, ours = _models(11)
    geometry = CacheGeometry(4, 12)
    length = 4 * geometry.capacity + 5
    bases = [10**9 + 12345, 3 * 10**9 + 7, 0]
    worst = _run_interleaved(hf, ours, geometry, 3, length, 11, bases=bases)
    assert worst < 1e-4, worst


def test_gqa_and_qkv_bias_family_streams_match() -> None:
    shape = SHAPE.replace(qkv_bias=True, num_kv_heads=3, family="qwen2")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    hf = AutoModelForCausalLM.from_config(shape_to_hf_config(shape), dtype=torch.float32)
    hf = hf.eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    ours = from_hf_model(hf, torch.float32, "cpu")
    geometry = CacheGeometry(2, 10)
    worst = _run_interleaved(hf, ours, geometry, 3, 4 * geometry.capacity, 5, bases=[0, 10**9, 7])
    assert worst < 1e-4, worst
