"""The whole-layer Triton kernels (sinkcache.core.ops.triton_linear), the decode batch set-up
(triton_fused.decode_prep) and the fp8 KV arena compute what the reference ops compute.

On a machine without CUDA the kernels run in Triton's interpreter (tests/conftest.py). Every case
draws fresh random data from its own seed and poisons what the kernel must write with NaN.
float32: rel err <= 1e-5; bf16: rel err < 1e-2 (the kernels round where the reference rounds, so
on the interpreter they agree exactly; a GPU sums in another order).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from torch.nn import functional as F

from sinkcache.config import PRESETS, CacheGeometry, ModelShape
from sinkcache.core.arena import FP8, KVArena, kv_bytes_per_slot, slots_for_budget
from sinkcache.core.attention import reference as attention_reference
from sinkcache.core.attention import triton_decode, triton_prefill
from sinkcache.core.attention.backend import REFERENCE, triton_backend
from sinkcache.core.model import Transformer
from sinkcache.core.ops import reference, triton_fused, triton_linear
from sinkcache.core.plan import PrefillChunk, StepPlan
from sinkcache.core.rope import inverse_frequencies
from sinkcache.core.runner import ModelRunner
from sinkcache.core.sampling import SamplerVariant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BASE_SEED = int(os.environ.get("SINKSERVE_TEST_SEED", random.SystemRandom().randrange(1 << 30)))


def _gen(case: int) -> torch.Generator:
    return torch.Generator().manual_seed(BASE_SEED + case)


def _where(case: int) -> str:
    return f"(seed {BASE_SEED + case}; replay with SINKSERVE_TEST_SEED={BASE_SEED})"


def _randn(shape, gen, dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _close(out: torch.Tensor, ref: torch.Tensor, case: int, what: str) -> None:
    assert torch.isfinite(out.float()).all(), f"{what}: unwritten or non-finite {_where(case)}"
    bound = 1e-5 if ref.dtype == torch.float32 else 1e-2
    err = _rel(out, ref)
    assert err <= bound, f"{what}: rel err {err:.2e} > {bound} {_where(case)}"


def _arena(shape, gen, kv_dtype):
    """K, V [6, Hkv, 8, D] in kv_dtype (fp8: codes of random values) and scales (fp8 only)."""
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    if kv_dtype != FP8:
        return k.to(DEVICE, kv_dtype), v.to(DEVICE, kv_dtype), None, None
    k_codes, k_scale = reference.quantize_fp8(k * 3.0)
    v_codes, v_scale = reference.quantize_fp8(v)
    return k_codes.to(DEVICE), v_codes.to(DEVICE), k_scale.to(DEVICE), v_scale.to(DEVICE)


def _kv_close(got, ref, case: int, what: str, quant: bool) -> None:
    """Arena contents: exact, or for fp8 the same codes up to rare one-code flips (a rotated key
    a float32 rounding away from a code boundary)."""
    if not quant:
        _close(got, ref, case, what)
        return
    same = (got.view(torch.uint8) == ref.view(torch.uint8)).double().mean().item()
    assert same >= 0.98, f"{what}: only {same:.1%} of fp8 codes agree {_where(case)}"
    _close(got.float(), ref.float(), case, what)


# ----------------------------------------------------------------------------------------------
# norm_qkv_rope

# (T, H, Hkv, D, dtype, residual, bias, block_n, fp8 arena)
QKV_CASES = [
    (1, 4, 2, 16, torch.float32, True, False, None, False),
    (5, 4, 2, 16, torch.float32, False, True, 4, False),  # two column blocks per half head
    (20, 3, 1, 32, torch.float32, True, True, 8, False),  # two row blocks
    (3, 9, 3, 64, torch.bfloat16, True, False, None, False),  # SmolLM2 heads
    (3, 4, 2, 16, torch.bfloat16, True, True, 4, False),
    (4, 4, 2, 16, torch.float32, True, False, None, True),
    (3, 9, 3, 64, torch.bfloat16, True, True, None, True),
]


@pytest.mark.parametrize(
    ("tokens", "heads", "kv_heads", "dim", "dtype", "has_residual", "has_bias", "block_n", "fp8"),
    QKV_CASES,
)
def test_norm_qkv_rope_matches_reference(
    tokens, heads, kv_heads, dim, dtype, has_residual, has_bias, block_n, fp8
):
    case = QKV_CASES.index(
        (tokens, heads, kv_heads, dim, dtype, has_residual, has_bias, block_n, fp8)
    )
    gen = _gen(case)
    hidden = 40 if dim == 16 else 96  # not a multiple of the K tile
    width = (heads + 2 * kv_heads) * dim
    x = _randn((tokens, hidden), gen, dtype, 2.0)
    residual = _randn((tokens, hidden), gen, dtype, 2.0) if has_residual else None
    norm_weight = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    weight = _randn((width, hidden), gen, dtype, hidden**-0.5)
    bias = _randn((width,), gen, dtype) if has_bias else None
    tables = [(torch.rand((tokens, dim), generator=gen) * 2 - 1).to(DEVICE) for _ in range(4)]
    kv_dtype = FP8 if fp8 else dtype
    slots_n, capacity = 6, 8
    k_cache, v_cache, k_scale, v_scale = _arena((slots_n, kv_heads, capacity, dim), gen, kv_dtype)
    position = torch.randperm(slots_n * capacity, generator=gen)[:tokens]
    slots, index = (position // capacity).to(DEVICE), (position % capacity).to(DEVICE)
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    ref_arena = [clone(t) for t in (k_cache, v_cache, k_scale, v_scale)]
    ref_q, ref_q_sink, ref_residual = reference.norm_qkv_rope(
        x, residual, norm_weight, 1e-5, weight, bias, *tables, ref_arena[0], ref_arena[1],
        slots, index, heads, kv_heads, ref_arena[2], ref_arena[3],
    )  # fmt: skip
    out = (
        torch.full_like(ref_q, float("nan")),
        torch.full_like(ref_q, float("nan")),
        torch.full_like(x, float("nan")),
    )
    config = None
    if block_n is not None:
        config = triton_linear.LinearConfig(16, block_n, 32, 4, 2)
    q, q_sink, new_residual = triton_linear.norm_qkv_rope(
        x, residual, norm_weight, 1e-5, weight, bias, *tables, k_cache, v_cache, slots, index,
        heads, kv_heads, k_scale, v_scale, config=config, out=out,
    )  # fmt: skip
    _close(q, ref_q, case, "q")
    _close(q_sink, ref_q_sink, case, "q_sink")
    if has_residual:
        assert torch.equal(new_residual, ref_residual), f"residual {_where(case)}"
    else:
        assert new_residual is x
    _kv_close(k_cache, ref_arena[0], case, "k arena", fp8)
    _kv_close(v_cache, ref_arena[1], case, "v arena", fp8)
    if fp8:
        _close(k_scale, ref_arena[2], case, "k scales")
        _close(v_scale, ref_arena[3], case, "v scales")


# ----------------------------------------------------------------------------------------------
# norm_gate_up_silu and linear

# (T, hidden, intermediate, dtype, residual, block_n)
MLP_CASES = [
    (1, 40, 80, torch.float32, True, None),
    (18, 96, 72, torch.float32, False, 16),  # masked column block, two row blocks
    (3, 96, 80, torch.bfloat16, True, 32),
]


@pytest.mark.parametrize(
    ("tokens", "hidden", "intermediate", "dtype", "has_residual", "block_n"), MLP_CASES
)
def test_norm_gate_up_silu_and_down_match_reference(
    tokens, hidden, intermediate, dtype, has_residual, block_n
):
    case = 100 + MLP_CASES.index((tokens, hidden, intermediate, dtype, has_residual, block_n))
    gen = _gen(case)
    x = _randn((tokens, hidden), gen, dtype, 2.0)
    residual = _randn((tokens, hidden), gen, dtype, 2.0) if has_residual else None
    norm_weight = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    weight = _randn((2 * intermediate, hidden), gen, dtype, hidden**-0.5 * 3)
    config = None if block_n is None else triton_linear.LinearConfig(16, block_n, 32, 4, 2)
    ref_h, ref_residual = reference.norm_gate_up_silu(x, residual, norm_weight, 1e-6, weight)
    out = (torch.full_like(ref_h, float("nan")), torch.full_like(x, float("nan")))
    h, new_residual = triton_linear.norm_gate_up_silu(
        x, residual, norm_weight, 1e-6, weight, config=config, out=out
    )
    _close(h, ref_h, case, "silu(gate) * up")
    assert torch.equal(new_residual, ref_residual) if has_residual else new_residual is x
    down = _randn((hidden, intermediate), gen, dtype, intermediate**-0.5)
    got = triton_linear.linear(ref_h, down, config=config, out=torch.full_like(x, float("nan")))
    _close(got, F.linear(ref_h, down), case, "down")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_o_proj_merges_decode_partials(dtype, num_splits):
    """linear over unmerged split partials = F.linear over the merged attention output."""
    case = 200 + num_splits + (dtype == torch.bfloat16)
    gen = _gen(case)
    group, kv_heads, dim, sink, window, batch = 3, 2, 16, 4, 60, 18
    heads, capacity = group * kv_heads, sink + window
    k_cache = _randn((batch + 2, kv_heads, capacity, dim), gen, dtype)
    v_cache = _randn((batch + 2, kv_heads, capacity, dim), gen, dtype)
    slots = torch.randperm(batch + 2, generator=gen)[:batch].to(DEVICE)
    # fill levels: fresh (only the first split holds keys), partial, full, wrapped
    seen = torch.tensor([[1, 3, 30, 64, 1000, 5][b % 6] for b in range(batch)], device=DEVICE)
    q = _randn((batch, heads, dim), gen, dtype)
    q_sink = _randn((batch, heads, dim), gen, dtype)
    partials = triton_decode.decode_attention_launch(
        q, q_sink, k_cache, v_cache, slots, seen, sink, 0.25,
        block_n=16, num_splits=num_splits, merge=False, poison_partials=True,
    )  # fmt: skip
    assert isinstance(partials, triton_decode.DecodePartials) == (num_splits > 1)
    weight = _randn((40, heads * dim), gen, dtype, (heads * dim) ** -0.5)
    attn = attention_reference.decode_attention(
        q, q_sink, k_cache, v_cache, slots, seen, sink, 0.25
    )
    ref = F.linear(attn.reshape(batch, -1), weight)
    if num_splits == 1:
        partials = partials.reshape(batch, -1)
    got = triton_linear.linear(partials, weight, kind="o_proj", dtype=dtype)
    _close(got, ref, case, "o_proj")


def test_decode_prep_matches_reference():
    gen = _gen(300)
    shape = PRESETS["llama3-8b"]  # llama3 rope scaling: inv_freq not a plain power law
    inv_freq, scaling = inverse_frequencies(shape)
    rows = 12
    seen = torch.tensor([0, 3, 4, 5, 1023, 1024, 1025, 10**7, 4 * 10**9, 17, 2048, 1])
    base = torch.randint(0, 10**9, (rows,), generator=gen) * (torch.arange(rows) % 2)
    next_token = torch.randint(0, 1000, (rows,), generator=gen)
    slots = torch.randperm(rows, generator=gen)
    args = [t.to(DEVICE) for t in (slots, seen, base, next_token, inv_freq)]
    got = triton_fused.decode_prep(*args, scaling, 4, 1020)
    ref = reference.decode_prep(*args, scaling, 4, 1020)
    for name, g, r in zip(
        ("token", "index", "seen", "cos", "sin", "sink_cos", "sink_sin"), got, ref, strict=True
    ):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        if g.dtype == torch.int64:
            assert torch.equal(g, r), name
        else:  # angles identical in float64; cos/sin within a few float32 ulp
            assert (g - r).abs().max().item() < 1e-6, name


# ----------------------------------------------------------------------------------------------
# fp8 arena: the store op and both attention kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_rope_store_matches_reference(dtype):
    case = 400 + (dtype == torch.bfloat16)
    gen = _gen(case)
    tokens, heads, kv_heads, dim = 7, 6, 2, 32
    qkv = _randn((tokens, (heads + 2 * kv_heads) * dim), gen, dtype, 5.0)
    tables = [(torch.rand((tokens, dim), generator=gen) * 2 - 1).to(DEVICE) for _ in range(4)]
    k_cache, v_cache, k_scale, v_scale = _arena((4, kv_heads, 8, dim), gen, FP8)
    position = torch.randperm(32, generator=gen)[:tokens]
    slots, index = (position // 8).to(DEVICE), (position % 8).to(DEVICE)
    ref = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    ref_q, _ = reference.rope_store(
        qkv, *tables, ref[0], ref[1], slots, index, heads, kv_heads, ref[2], ref[3]
    )
    q, _ = triton_fused.rope_store(
        qkv, *tables, k_cache, v_cache, slots, index, heads, kv_heads, k_scale, v_scale
    )
    _close(q, ref_q, case, "q")
    _kv_close(k_cache, ref[0], case, "k codes", True)
    _kv_close(v_cache, ref[1], case, "v codes", True)
    _close(k_scale, ref[2], case, "k scales")
    _close(v_scale, ref[3], case, "v scales")
    # What was written dequantises to the rotated key within e4m3's half-ulp (2^-4 relative).
    k_ref = ref_q.new_empty(0)  # noqa: F841 (the reference arena is the oracle above)
    written = attention_reference.dequantize(
        k_cache[slots, :, index], k_scale[slots, :, index]
    )  # [T, Hkv, D]
    v_in = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim).float()
    v_back = attention_reference.dequantize(v_cache[slots, :, index], v_scale[slots, :, index])
    assert written.shape == v_back.shape
    assert ((v_back - v_in).abs() <= v_in.abs().amax(-1, keepdim=True) / 16 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_decode_matches_reference(dtype, num_splits):
    case = 500 + num_splits + (dtype == torch.bfloat16)
    gen = _gen(case)
    group, kv_heads, dim, sink, window, batch = 4, 2, 32, 4, 44, 6
    heads, capacity = group * kv_heads, sink + window
    k_cache, v_cache, k_scale, v_scale = _arena((batch + 2, kv_heads, capacity, dim), gen, FP8)
    slots = torch.randperm(batch + 2, generator=gen)[:batch].to(DEVICE)
    seen = torch.tensor([1, 3, 4, 20, 48, 5000], device=DEVICE)
    q, q_sink = _randn((batch, heads, dim), gen, dtype), _randn((batch, heads, dim), gen, dtype)
    ref = attention_reference.decode_attention(
        q, q_sink, k_cache, v_cache, slots, seen, sink, 0.2, k_scale, v_scale
    )
    out = torch.full_like(ref, float("nan"))
    triton_decode.decode_attention_launch(
        q, q_sink, k_cache, v_cache, slots, seen, sink, 0.2, k_scale=k_scale, v_scale=v_scale,
        block_n=16, num_splits=num_splits, out=out, poison_partials=True,
    )  # fmt: skip
    _close(out, ref, case, "fp8 decode")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_prefill_matches_reference(dtype):
    case = 600 + (dtype == torch.bfloat16)
    gen = _gen(case)
    group, kv_heads, dim, sink, window = 2, 2, 32, 4, 28
    heads, capacity = group * kv_heads, sink + window
    rows = [(28, 28), (5, 5), (0, 9), (7, 300)]  # (chunk length, seen after it)
    lengths = [n for n, _ in rows]
    k_cache, v_cache, k_scale, v_scale = _arena((6, kv_heads, capacity, dim), gen, FP8)
    row_slots = torch.randperm(6, generator=gen)[: len(rows)].to(DEVICE)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(DEVICE)
    row_seen = torch.tensor([s for _, s in rows]).to(DEVICE)
    q = _randn((sum(lengths), heads, dim), gen, dtype)
    q_sink = _randn((sum(lengths), heads, dim), gen, dtype)
    args = (k_cache, v_cache, row_slots, cu, row_seen, sink, window, 0.2)
    ref = attention_reference.prefill_attention(q, q_sink, *args, k_scale, v_scale)
    out = torch.full_like(ref, float("nan"))
    triton_prefill.prefill_attention_launch(
        q, q_sink, *args, k_scale=k_scale, v_scale=v_scale, block_m=16, block_n=16, out=out
    )
    _close(out, ref, case, "fp8 prefill")


def test_fp8_arena_halves_the_bytes():
    shape, geometry = PRESETS["smollm2-135m"], CacheGeometry(4, 1020)
    bf16, fp8 = (
        kv_bytes_per_slot(shape, geometry, torch.bfloat16),
        kv_bytes_per_slot(shape, geometry, FP8),
    )
    assert fp8 == bf16 // 2 + 2 * 30 * 3 * 4 * 1024  # codes + a float32 scale per token and head
    budget = 100 * 2**30
    ratio = slots_for_budget(shape, geometry, FP8, budget) / slots_for_budget(
        shape, geometry, torch.bfloat16, budget
    )
    assert 1.85 < ratio <= 2.0
    arena = KVArena(shape.replace(num_layers=2), CacheGeometry(4, 12), 3, torch.float32, "cpu", FP8)
    assert arena.quantized and arena.k.dtype == FP8 and arena.k_scale.shape == (2, 4, 3, 16)
    assert arena.layer_scales(1)[0].shape == (4, 3, 16)


# ----------------------------------------------------------------------------------------------
# whole forwards: fused layers, fp8 arena, the graph decode step's batch

TINY = ModelShape(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    qkv_bias=True,
)


def _tiny_model(seed: int) -> Transformer:
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(TINY)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return model.to(DEVICE).eval()


def _runners(model, kv_dtypes, fused_rows: int, slots: int = 5):
    """{(backend, kv dtype): runner} over identical arenas; Triton takes the fused kernels for
    forwards of up to `fused_rows` tokens."""
    base = triton_backend()
    fused = type(base)(**{**base.__dict__, "fused_rows": lambda shape: fused_rows})
    runners = {}
    for name, backend in (("reference", REFERENCE), ("triton", fused)):
        for kv_dtype in kv_dtypes:
            arena = KVArena(TINY, CacheGeometry(4, 12), slots, torch.float32, DEVICE, kv_dtype)
            for i in range(slots):
                arena.allocate(base=(10**6 if i % 2 else 0))
            runners[name, kv_dtype] = ModelRunner(model, arena, backend)
    return runners


def _run_steps(runners, gen, steps):
    """Feed the same steps to every runner; returns {key: [logits per step]}."""
    streams = torch.randint(0, TINY.vocab_size, (5, 60), generator=gen).tolist()
    fed = {key: [0] * 5 for key in runners}
    logits = {key: [] for key in runners}
    for decode_slots, prefill in steps:
        for key, runner in runners.items():
            f = fed[key]
            tokens = [streams[s][f[s]] for s in decode_slots]
            for s in decode_slots:
                f[s] += 1
            chunks = []
            for s, n in prefill:
                chunks.append(PrefillChunk(s, streams[s][f[s] : f[s] + n], f[s]))
                f[s] += n
            plan = StepPlan(decode_slots=decode_slots, prefill=chunks)
            logits[key].append(runner.forward_logits(plan, decode_tokens=tokens))
    return logits


STEPS = [
    ([], [(0, 10), (1, 12), (2, 3), (3, 1)]),
    ([0, 1, 2, 3], []),  # decode only: split partials merged in o_proj
    ([0, 1, 2, 3], [(4, 9)]),
    ([1, 2, 3, 4, 0], []),
    ([0, 1, 2, 3, 4], [(1, 7)]),  # slot 1 wraps its ring
    ([4, 3, 2, 1, 0], []),
]


def test_fused_forward_matches_reference_backend():
    """Fused layers on every step (mixed, decode-only, wrapping) against the reference backend,
    and an fp8 arena through both backends."""
    model = _tiny_model(BASE_SEED + 700)
    runners = _runners(model, (torch.float32, FP8), fused_rows=64)
    logits = _run_steps(runners, _gen(700), STEPS)
    for kv_dtype, bound in ((torch.float32, 1e-4), (FP8, 1e-3)):
        for step, (got, ref) in enumerate(
            zip(logits["triton", kv_dtype], logits["reference", kv_dtype], strict=True)
        ):
            assert ref.abs().max() > 0.5
            err = (got - ref).abs().max().item() / ref.abs().max().item()
            assert err < bound, f"{kv_dtype} step {step}: {err:.2e} {_where(700)}"
    # fp8 against a float32 arena: the format's error, small but not zero
    for got, ref in zip(
        logits["reference", FP8][1:], logits["reference", torch.float32][1:], strict=True
    ):
        err = _rel(got, ref)
        assert 0 < err < 0.15, f"fp8 arena vs float32 arena: rel err {err:.3e}"


def test_unfused_forward_with_fp8_arena_matches_reference():
    """The op-by-op Triton path (fused_rows 0) with an fp8 arena."""
    model = _tiny_model(BASE_SEED + 800)
    runners = _runners(model, (FP8,), fused_rows=0)
    logits = _run_steps(runners, _gen(800), STEPS[:2])
    for got, ref in zip(logits["triton", FP8], logits["reference", FP8], strict=True):
        assert (got - ref).abs().max().item() / ref.abs().max().item() < 1e-3


def test_graph_decode_step_matches_eager_decode():
    """decode_step_tensors (decode_prep + fused layers + sampling: what a CUDA graph captures)
    produces the tokens and arena state the eager reference path produces."""
    model = _tiny_model(BASE_SEED + 900)
    runners = _runners(model, (torch.float32,), fused_rows=64, slots=4)
    for runner in runners.values():
        plan = StepPlan(prefill=[PrefillChunk(s, [1 + s, 7, 9, 11 + s], 0) for s in range(4)])
        runner.execute(plan).wait()
    slots = torch.tensor([2, 0, 3, 1], device=DEVICE)
    tokens = {}
    for key, runner in runners.items():
        produced = []
        for _ in range(3):
            if key[0] == "triton":
                produced.append(runner.decode_step_tensors(slots, SamplerVariant.GREEDY).tolist())
            else:
                result = runner.execute(StepPlan(decode_slots=slots.tolist())).wait()
                produced.append(result.decode_tokens.tolist())
        tokens[key[0]] = produced
    assert tokens["triton"] == tokens["reference"]
    arenas = {key[0]: runner.arena for key, runner in runners.items()}
    assert torch.equal(arenas["triton"].seen, arenas["reference"].seen)
    assert (arenas["triton"].k - arenas["reference"].k).abs().max() < 1e-5
