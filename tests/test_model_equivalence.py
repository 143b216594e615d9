"""With a cache that never evicts, our forward equals transformers' own model on the same weights."""

from __future__ import annotations

import pytest
import torch

from sinkcache.config import (
    CacheGeometry,
    ModelShape,
    UnsupportedModelError,
    shape_from_hf_config,
    shape_to_hf_config,
)
from sinkcache.core.arena import KVArena
from sinkcache.core.attention.backend import REFERENCE
from sinkcache.core.plan import PrefillChunk, StepPlan
from sinkcache.core.runner import ModelRunner
from sinkcache.models.loader import from_hf_model
from tests.seeds import replay_hint, seed_for

BASE = ModelShape(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=256,
)

FAMILIES = {
    "llama2": ("llama", BASE),
    "llama3-rope-scaling": (
        "llama",
        BASE.replace(
            rope_theta=500000.0,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "mistral": ("mistral", BASE.replace(num_heads=4, num_kv_heads=1)),
    "qwen2-qkv-bias": ("qwen2", BASE.replace(qkv_bias=True, num_kv_heads=3)),
    "smollm2-tied": ("llama", BASE.replace(tie_word_embeddings=True, num_heads=3, num_kv_heads=1)),
}


def _hf_model(architecture: str, shape: ModelShape, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = shape_to_hf_config(shape, architecture)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-inits biases; give them values so the bias path is exercised
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_logits_match_transformers(family: str) -> None:
    architecture, shape = FAMILIES[family]
    seed = seed_for(family)
    print(f"{family}: weights from seed {seed} ({replay_hint()})")
    hf = _hf_model(architecture, shape, seed=seed)
    ours = from_hf_model(hf, torch.float32, "cpu")
    assert shape_from_hf_config(hf.config) == ours.shape

    length = 70  # past the llama3 original window of 32 so the scaled frequencies matter
    ids = torch.randint(
        0, shape.vocab_size, (2, length), generator=torch.Generator().manual_seed(7)
    )
    with torch.no_grad():
        expected = hf(input_ids=ids).logits  # [2, length, V]

    arena = KVArena(ours.shape, CacheGeometry(sink=4, window=96), 3, torch.float32, "cpu")
    runner = ModelRunner(ours, arena, REFERENCE)
    slot_a, slot_b = arena.allocate(), arena.allocate()
    got = {0: [], 1: []}
    # Session A: chunk of 20, then decode steps; session B: chunks of 9 and 30, interleaved with A.
    pos = {0: 0, 1: 0}
    slots = {0: slot_a, 1: slot_b}

    def chunk(row: int, n: int) -> PrefillChunk:
        tokens = ids[row, pos[row] : pos[row] + n].tolist()
        c = PrefillChunk(slots[row], tokens, pos[row])
        pos[row] += n
        return c

    schedule = [("p", 0, 20), ("p", 1, 9)] + [("d", 0, 1)] * 5 + [("p", 1, 30)]
    schedule += [("d", 0, 1), ("p", 1, 2)] * 3 + [("mixed", None, None)] * 4
    while pos[0] < length or pos[1] < length:
        kind, row, n = schedule.pop(0) if schedule else ("mixed", None, None)
        if kind == "p":
            logits = runner.forward_logits(StepPlan(prefill=[chunk(row, n)]))
            got[row].append(logits)
        elif kind == "d":
            tok = ids[row, pos[row]].item()
            pos[row] += 1
            logits = runner.forward_logits(StepPlan(decode_slots=[slots[row]]), decode_tokens=[tok])
            got[row].append(logits)
        else:  # A decodes while B prefills in the same step
            decode_rows = [r for r in (0, 1) if pos[r] < length][:1]
            prefill_rows = [r for r in (0, 1) if pos[r] < length and r not in decode_rows]
            toks = [ids[r, pos[r]].item() for r in decode_rows]
            for r in decode_rows:
                pos[r] += 1
            chunks = [chunk(r, min(5, length - pos[r])) for r in prefill_rows]
            logits = runner.forward_logits(
                StepPlan(decode_slots=[slots[r] for r in decode_rows], prefill=chunks),
                decode_tokens=toks,
            )
            offset = len(decode_rows)
            for i, r in enumerate(decode_rows):
                got[r].append(logits[i : i + 1])
            for r, c in zip(prefill_rows, chunks, strict=True):
                got[r].append(logits[offset : offset + len(c.tokens)])
                offset += len(c.tokens)
    for row in (0, 1):
        ours_logits = torch.cat(got[row])
        assert ours_logits.shape == expected[row].shape
        diff = (ours_logits - expected[row]).abs().max().item()
        assert diff < 1e-4, f"{family} row {row}: max abs diff {diff} (seed {seed})"


def test_unsupported_architecture_is_refused() -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        shape_from_hf_config(config)
    dynamic = shape_to_hf_config(
        BASE.replace(rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    )
    with pytest.raises(UnsupportedModelError, match="RoPE"):
        shape_from_hf_config(dynamic)
