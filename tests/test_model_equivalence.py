"""With a cache that never evicts, our forward equals transformers' own model on the same weights,
for every family of sinkcache.families (each shape names its family)."""

from __future__ import annotations

import pytest
import torch

from sinkcache.config import CacheGeometry, ModelShape, UnsupportedModelError
from sinkcache.core.arena import KVArena
from sinkcache.core.attention.backend import REFERENCE, select_backend, triton_backend
from sinkcache.core.plan import PrefillChunk, StepPlan
from sinkcache.core.runner import ModelRunner
from sinkcache.families import FAMILIES as FAMILY_TABLE
from sinkcache.families import shape_from_hf_config, shape_to_hf_config
from sinkcache.models.loader import from_hf_model
from tests.seeds import replay_hint, seed_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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
    "llama2": BASE,
    "llama3-rope-scaling": BASE.replace(
        rope_theta=500000.0,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    # Llama's attention_bias biases o_proj too (the loader once dropped that bias without a word).
    "llama-attention-bias": BASE.replace(qkv_bias=True, o_proj_bias=True),
    "mistral": BASE.replace(family="mistral", num_heads=4, num_kv_heads=1),
    "qwen2-qkv-bias": BASE.replace(family="qwen2", qkv_bias=True, num_kv_heads=3),
    "qwen3-qk-norm": BASE.replace(family="qwen3", qk_norm=True, tie_word_embeddings=True),
    # head_dim 12: not a power of two, as Phi-3-mini's 96 (the reference kernels take any).
    "phi3-fused-weights": BASE.replace(family="phi3", num_heads=4, num_kv_heads=4, head_dim=12),
    "smollm2-tied": BASE.replace(tie_word_embeddings=True, num_heads=3, num_kv_heads=1),
}


def test_every_family_of_the_table_is_tested() -> None:
    assert {shape.family for shape in FAMILIES.values()} == set(FAMILY_TABLE)


def _hf_model(shape: ModelShape, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = shape_to_hf_config(shape)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-inits biases and one-inits norms: give them values that matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif name.endswith("norm.weight"):
                param.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_logits_match_transformers(family: str) -> None:
    shape = FAMILIES[family]
    seed = seed_for(family)
    print(f"{family}: weights from seed {seed} ({replay_hint()})")
    hf = _hf_model(shape, seed=seed)
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
    partial = shape_to_hf_config(BASE.replace(family="phi3"))
    partial.rope_parameters["partial_rotary_factor"] = 0.75  # Phi-4-mini's
    with pytest.raises(UnsupportedModelError, match="partial RoPE"):
        shape_from_hf_config(partial)


def test_a_checkpoint_tensor_the_block_would_drop_is_refused() -> None:
    """A Qwen3 checkpoint whose config says Llama has q/k norm weights a Llama block has no place
    for: refused, not loaded without them."""
    hf = _hf_model(FAMILIES["qwen3-qk-norm"], seed=11)
    hf.config.model_type = "llama"
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        from_hf_model(hf, torch.float32, "cpu")


def test_a_shape_its_family_cannot_express_is_refused() -> None:
    with pytest.raises(ValueError, match="qkv_bias"):
        shape_to_hf_config(BASE.replace(family="qwen2"))  # Qwen2 always has the bias
    with pytest.raises(ValueError, match="qk_norm"):
        shape_to_hf_config(BASE.replace(qk_norm=True))  # no Llama has it
    with pytest.raises(ValueError, match="attention_bias"):
        shape_to_hf_config(BASE.replace(qkv_bias=True))  # Llama biases o_proj alike


# The Triton attention kernels need a power-of-two head_dim (Phi-3-medium's 128 is one).
TRITON_SHAPES = {
    "qwen3-qk-norm": FAMILIES["qwen3-qk-norm"],
    "phi3-fused-weights": FAMILIES["phi3-fused-weights"].replace(hidden_size=64, head_dim=16),
}


@pytest.mark.parametrize("family", sorted(TRITON_SHAPES))
def test_new_families_run_the_triton_kernels(family: str) -> None:
    """The q/k norm runs the backend's fused norm: the Triton backend (Triton's interpreter on a
    machine without CUDA) gives the reference backend's logits, prefill then decode."""
    shape = TRITON_SHAPES[family]
    seed = seed_for(family + "-triton")
    print(f"{family}: weights from seed {seed} ({replay_hint()})")
    ours = from_hf_model(_hf_model(shape, seed=seed), torch.float32, DEVICE)
    ids = torch.randint(0, shape.vocab_size, (24,), generator=torch.Generator().manual_seed(seed))
    logits = {}
    for backend in (REFERENCE, triton_backend()):
        arena = KVArena(ours.shape, CacheGeometry(sink=4, window=12), 2, torch.float32, DEVICE)
        runner = ModelRunner(ours, arena, backend)
        slot = arena.allocate()
        steps = []
        for start, end in ((0, 12), (12, 19)):  # chunks of at most the window; the ring wraps at 16
            chunk = PrefillChunk(slot, ids[start:end].tolist(), start)
            steps.append(runner.forward_logits(StepPlan(prefill=[chunk])))
        for pos in range(19, 24):
            plan = StepPlan(decode_slots=[slot])
            steps.append(runner.forward_logits(plan, decode_tokens=[ids[pos].item()]))
        logits[backend.name] = torch.cat(steps)
    ref = logits["reference"]
    assert ref.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    diff = (logits["triton"] - ref).abs().max().item()
    assert diff < 1e-4, f"{family}: max abs diff {diff:.2e} (seed {seed})"


def test_a_head_the_triton_kernels_cannot_tile_is_refused_before_a_step() -> None:
    """Phi-3-mini's head_dim 96: one line at engine build, not an assert inside the first step."""
    with pytest.raises(ValueError, match=r"head_dim .* power of two.* 96.*--attention reference"):
        select_backend("cuda", "auto", head_dim=96)
    with pytest.raises(ValueError, match="96"):
        select_backend("cuda", "triton", head_dim=96)
    assert select_backend("cuda", "reference", head_dim=96) is REFERENCE
    assert select_backend("cpu", "auto", head_dim=96) is REFERENCE
