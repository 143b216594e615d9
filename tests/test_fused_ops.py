"""The fused Triton ops compute the reference ops (sinkcache.core.ops.reference), and the model forward
with the Triton backend computes what it computes with the reference backend: op by op, with an
fp8 KV arena, and as the graph decode step (decode_prep).

On a machine without CUDA the kernels run in Triton's interpreter (tests/conftest.py). Every case
draws fresh random data from its own seed, poisons the outputs with NaN so an unwritten element
fails, and checks that arena positions nobody writes keep their bits. float32: max abs error
<= 1e-5 (scaled by the largest reference magnitude when above 1); bf16 / fp16: rel err < 1e-2.
The fp8 store compares by relative error (float32 1e-5, bf16 1e-2).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sinkcache.config import PRESETS, CacheGeometry, ModelShape
from sinkcache.core.arena import FP8, KVArena, kv_bytes_per_slot, slots_for_budget
from sinkcache.core.attention import reference as attention_reference
from sinkcache.core.attention.backend import REFERENCE, triton_backend
from sinkcache.core.model import Transformer
from sinkcache.core.ops import reference, triton_fused
from sinkcache.core.plan import PrefillChunk, StepPlan
from sinkcache.core.rope import inverse_frequencies
from sinkcache.core.runner import ModelRunner
from sinkcache.core.sampling import SamplerVariant
from tests.seeds import BASE_SEED, replay_hint

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16)


def _generator(case: int) -> torch.Generator:
    return torch.Generator().manual_seed(BASE_SEED + case)


def _where(case: int) -> str:
    return f"(seed {BASE_SEED + case}; {replay_hint()})"


def _randn(shape, gen, dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)


def _case_id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def _assert_close(out: torch.Tensor, ref: torch.Tensor, case: int, what: str) -> None:
    where = f"{what} {_where(case)}"
    assert out.shape == ref.shape and out.dtype == ref.dtype, where
    assert torch.isfinite(out).all(), f"unwritten (NaN-poisoned) or non-finite outputs: {where}"
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    if out.dtype == torch.float32:
        err = (out64 - ref64).abs().max().item()
        bound = 1e-5 * max(1.0, ref64.abs().max().item())
        assert err <= bound, f"max abs err {err:.3e} > {bound:.1e}: {where}"
    else:
        err = ((out64 - ref64).norm() / ref64.norm()).item()
        assert err < 1e-2, f"rel err {err:.3e} >= 1e-2: {where}"


# ----------------------------------------------------------------------------------------------
# add_rms_norm

# (T, hidden, dtype, with residual); hidden: SmolLM2, tiny, not a power of two, Llama-size.
NORM_CASES = [
    *itertools.product((1, 3, 64), (576, 48, 100), DTYPES, (True, False)),
    (3, 4096, torch.bfloat16, True),
    (3, 576, torch.float16, True),
]


@pytest.mark.parametrize(("tokens", "hidden", "dtype", "with_residual"), NORM_CASES, ids=_case_id)
def test_add_rms_norm_matches_reference(tokens, hidden, dtype, with_residual):
    case = NORM_CASES.index((tokens, hidden, dtype, with_residual))
    gen = _generator(case)
    strided = case % 2 == 1  # x as a view of a wider tensor
    wide = _randn((tokens, hidden * (2 if strided else 1)), gen, dtype, scale=3.0)
    x = wide[:, :hidden]
    residual = _randn((tokens, hidden), gen, dtype, scale=3.0) if with_residual else None
    weight = (1.0 + 0.3 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    eps = 1e-5 if case % 3 else 1e-6

    out = _nan_like(x.contiguous())
    residual_out = _nan_like(x.contiguous())
    normed, new_residual = triton_fused.add_rms_norm(
        x, residual, weight, eps, out=out, residual_out=residual_out
    )
    ref_normed, ref_residual = reference.add_rms_norm(x, residual, weight, eps)
    assert normed is out
    _assert_close(normed, ref_normed, case, "normed")
    if with_residual:
        assert new_residual is residual_out
        # One rounded add, as PyTorch does it: bit-exact in every dtype.
        assert torch.equal(new_residual, ref_residual), f"new residual {_where(case)}"
    else:
        assert new_residual is x and torch.isnan(residual_out).all()
    if dtype == torch.bfloat16:
        # The reference rounds twice (normalised float32 -> bf16, then * weight -> bf16); so does
        # the kernel, whose float32 sum may differ in its last bits. So each output must be the
        # weight times one of the two bf16 neighbours of the float32 normalised value, rounded
        # once; a flip near a tie can move the output by two ulps, which this allows exactly.
        # The reference in float32 with a unit weight is the float32 normalised value itself.
        unit = torch.ones(hidden, dtype=torch.float32, device=DEVICE)
        normalised, _ = reference.add_rms_norm(new_residual.float(), None, unit, eps)
        low, high = _bf16_neighbours(normalised)
        allowed = (normed == weight * low) | (normed == weight * high)
        assert allowed.all(), f"bf16 norm not from a bf16 neighbour {_where(case)}"
        # Such flips are rare (26 in 1.5 M elements measured): a kernel rounding its own way
        # would flip far more than 1% (or two, on a short row).
        flipped = (normed != ref_normed).sum().item()
        assert flipped <= max(2, normed.numel() // 100), (
            f"{flipped} of {normed.numel()} differ from the reference {_where(case)}"
        )


def _bf16_neighbours(x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values next to each float32 value: toward zero and away from it (equal when x32
    is a bf16 value). bf16 is the top half of a float32's bits."""
    bits = x32.view(torch.int32)
    toward_zero = bits & ~0xFFFF
    away = torch.where(bits == toward_zero, toward_zero, toward_zero + 0x10000)
    return (
        toward_zero.view(torch.float32).to(torch.bfloat16),
        away.view(torch.float32).to(torch.bfloat16),
    )


# ----------------------------------------------------------------------------------------------
# rope_store

# (T, H, Hkv, D, dtype): SmolLM2, tiny GQA, many heads with small D, D=128, and D=80 (half not a
# power of two: masked halves).
ROPE_CASES = [
    *itertools.product((1, 3, 64), ((9, 3, 64), (4, 2, 16), (32, 8, 16), (4, 2, 128)), DTYPES),
    (3, (2, 1, 80), torch.float32),
    (3, (9, 3, 64), torch.float16),
]
ARENA_SLOTS, ARENA_CAPACITY = 9, 8  # 72 positions: room for 64 distinct tokens


def _rotation(tokens: int, dim: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, D] float32. Unlike RotaryTable's, the two halves differ, so a kernel that reads
    cos/sin of the wrong half (or element) fails."""
    cos_sin = torch.rand((2, tokens, dim), generator=gen) * 2.0 - 1.0
    return cos_sin[0].to(DEVICE), cos_sin[1].to(DEVICE)


@pytest.mark.parametrize(("tokens", "heads", "dtype"), ROPE_CASES, ids=_case_id)
def test_rope_store_matches_reference(tokens, heads, dtype):
    case = 1000 + ROPE_CASES.index((tokens, heads, dtype))
    gen = _generator(case)
    num_heads, num_kv_heads, dim = heads
    width = (num_heads + 2 * num_kv_heads) * dim
    strided = case % 2 == 1  # qkv as a view of a wider tensor
    qkv = _randn((tokens, width + (dim if strided else 0)), gen, dtype)[:, :width]
    cos, sin = _rotation(tokens, dim, gen)
    sink_cos, sink_sin = _rotation(tokens, dim, gen)
    arena_shape = (ARENA_SLOTS, num_kv_heads, ARENA_CAPACITY, dim)
    k_cache, v_cache = _randn(arena_shape, gen, dtype), _randn(arena_shape, gen, dtype)
    # Distinct (slot, index) positions, in random order.
    position = torch.randperm(ARENA_SLOTS * ARENA_CAPACITY, generator=gen)[:tokens]
    slots = (position // ARENA_CAPACITY).to(DEVICE)
    write_index = (position % ARENA_CAPACITY).to(DEVICE)
    written = torch.zeros((ARENA_SLOTS, ARENA_CAPACITY), dtype=torch.bool, device=DEVICE)
    written[slots, write_index] = True
    written = written[:, None, :, None].expand(arena_shape)

    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_q, ref_q_sink = reference.rope_store(
        qkv, cos, sin, sink_cos, sink_sin, ref_k, ref_v, slots, write_index,
        num_heads, num_kv_heads,
    )  # fmt: skip
    # Poison what the kernel must write: q outputs and the arena positions of this step.
    k_cache[written], v_cache[written] = float("nan"), float("nan")
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = (_nan_like(ref_q), _nan_like(ref_q_sink))
    q, q_sink = triton_fused.rope_store(
        qkv, cos, sin, sink_cos, sink_sin, k_cache, v_cache, slots, write_index,
        num_heads, num_kv_heads, out=out,
    )  # fmt: skip

    assert q is out[0] and q_sink is out[1]
    _assert_close(q, ref_q, case, "q")
    _assert_close(q_sink, ref_q_sink, case, "q_sink")
    _assert_close(k_cache[slots, :, write_index], ref_k[slots, :, write_index], case, "k")
    assert torch.equal(v_cache[slots, :, write_index], ref_v[slots, :, write_index]), (
        f"v must be copied exactly {_where(case)}"
    )
    for name, got, before in (("k", k_cache, k_before), ("v", v_cache, v_before)):
        assert torch.equal(got[~written], before[~written]), (
            f"{name} arena changed outside the written positions {_where(case)}"
        )


# ----------------------------------------------------------------------------------------------
# silu_mul

# (T, I, dtype): SmolLM2 (unmasked blocks of 512), Llama-3-8B width, a masked tile, an odd width.
SILU_CASES = [
    *itertools.product((1, 3, 64), (1536, 80, 100), DTYPES),
    (3, 14336, torch.bfloat16),
    (3, 1536, torch.float16),
]


@pytest.mark.parametrize(("tokens", "intermediate", "dtype"), SILU_CASES, ids=_case_id)
def test_silu_mul_matches_reference(tokens, intermediate, dtype):
    case = 2000 + SILU_CASES.index((tokens, intermediate, dtype))
    gen = _generator(case)
    strided = case % 2 == 1
    gate_up = _randn((tokens, 2 * intermediate + (8 if strided else 0)), gen, dtype, scale=4.0)
    gate_up = gate_up[:, : 2 * intermediate]
    ref = reference.silu_mul(gate_up)
    out = triton_fused.silu_mul(gate_up, out=_nan_like(ref))
    _assert_close(out, ref, case, "silu_mul")


# ----------------------------------------------------------------------------------------------
# fp8 arena: the store op


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _close_rel(out: torch.Tensor, ref: torch.Tensor, case: int, what: str) -> None:
    assert torch.isfinite(out.float()).all(), f"{what}: unwritten or non-finite {_where(case)}"
    bound = 1e-5 if ref.dtype == torch.float32 else 1e-2
    err = _rel(out, ref)
    assert err <= bound, f"{what}: rel err {err:.2e} > {bound} {_where(case)}"


def _fp8_arena(shape, gen):
    """K, V codes of random values (keys with a larger range) and their float32 scales."""
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    k_codes, k_scale = reference.quantize_fp8(k * 3.0)
    v_codes, v_scale = reference.quantize_fp8(v)
    return k_codes.to(DEVICE), v_codes.to(DEVICE), k_scale.to(DEVICE), v_scale.to(DEVICE)


def _codes_close(got: torch.Tensor, ref: torch.Tensor, case: int, what: str) -> None:
    """The same fp8 codes up to rare one-code flips (a rotated key a float32 rounding away from a
    code boundary)."""
    same = (got.view(torch.uint8) == ref.view(torch.uint8)).double().mean().item()
    assert same >= 0.98, f"{what}: only {same:.1%} of fp8 codes agree {_where(case)}"
    _close_rel(got.float(), ref.float(), case, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=_case_id)
def test_fp8_rope_store_matches_reference(dtype):
    case = 400 + (dtype == torch.bfloat16)
    gen = _generator(case)
    tokens, heads, kv_heads, dim = 7, 6, 2, 32
    qkv = _randn((tokens, (heads + 2 * kv_heads) * dim), gen, dtype, 5.0)
    tables = [(torch.rand((tokens, dim), generator=gen) * 2 - 1).to(DEVICE) for _ in range(4)]
    k_cache, v_cache, k_scale, v_scale = _fp8_arena((4, kv_heads, 8, dim), gen)
    position = torch.randperm(32, generator=gen)[:tokens]
    slots, index = (position // 8).to(DEVICE), (position % 8).to(DEVICE)
    ref = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    ref_q, _ = reference.rope_store(
        qkv, *tables, ref[0], ref[1], slots, index, heads, kv_heads, ref[2], ref[3]
    )
    q, _ = triton_fused.rope_store(
        qkv, *tables, k_cache, v_cache, slots, index, heads, kv_heads, k_scale, v_scale
    )
    _close_rel(q, ref_q, case, "q")
    _codes_close(k_cache, ref[0], case, "k codes")
    _codes_close(v_cache, ref[1], case, "v codes")
    _close_rel(k_scale, ref[2], case, "k scales")
    _close_rel(v_scale, ref[3], case, "v scales")
    # What was written dequantises to the input within e4m3's half-ulp (2^-4 relative).
    written = attention_reference.dequantize(
        k_cache[slots, :, index], k_scale[slots, :, index]
    )  # [T, Hkv, D]
    v_in = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim).float()
    v_back = attention_reference.dequantize(v_cache[slots, :, index], v_scale[slots, :, index])
    assert written.shape == v_back.shape
    assert ((v_back - v_in).abs() <= v_in.abs().amax(-1, keepdim=True) / 16 + 1e-6).all()


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
# decode_prep


def test_decode_prep_matches_reference():
    gen = _generator(300)
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


def test_empty_batches_launch_nothing():
    x = torch.empty((0, 48), device=DEVICE)
    normed, residual = triton_fused.add_rms_norm(x, x, torch.ones(48, device=DEVICE), 1e-5)
    assert normed.shape == residual.shape == (0, 48)
    assert triton_fused.silu_mul(torch.empty((0, 160), device=DEVICE)).shape == (0, 80)


# ----------------------------------------------------------------------------------------------
# the whole forward

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
    """Random weights large enough that every op moves the logits (std ~1)."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(TINY)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return model.to(DEVICE).eval()


def test_triton_backend_forward_matches_reference_backend():
    """Prefill, then mixed steps (decode rows + prefill chunks), one that wraps a slot's ring:
    logits within 1e-4 and the same arena contents."""
    model = _tiny_model(BASE_SEED + 3000)
    gen = _generator(3000)
    geometry = CacheGeometry(sink=4, window=12)
    runners = {}
    for name, backend in (("reference", REFERENCE), ("triton", triton_backend())):
        arena = KVArena(TINY, geometry, 4, torch.float32, DEVICE)
        for base in (0, 10**6, 0):
            arena.allocate(base=base)
        runners[name] = ModelRunner(model, arena, backend)
    streams = torch.randint(0, TINY.vocab_size, (3, 40), generator=gen).tolist()
    fed = [0, 0, 0]

    def chunk(slot: int, n: int) -> PrefillChunk:
        c = PrefillChunk(slot, streams[slot][fed[slot] : fed[slot] + n], fed[slot])
        fed[slot] += n
        return c

    steps = [
        ([], [(0, 10), (1, 12)]),
        ([0, 1], [(2, 7)]),  # decode rows, then a prefill chunk
        ([0, 2], [(1, 9)]),  # slot 1 passes capacity (16): its ring wraps
    ]
    for decode_slots, prefill in steps:
        tokens = [streams[s][fed[s]] for s in decode_slots]
        for s in decode_slots:
            fed[s] += 1
        chunks = [chunk(s, n) for s, n in prefill]
        logits = {
            name: runner.forward_logits(
                StepPlan(decode_slots=decode_slots, prefill=chunks), decode_tokens=tokens
            )
            for name, runner in runners.items()
        }
        ref = logits["reference"]
        assert ref.abs().max() > 0.5, "logits too small for the comparison to mean anything"
        err = (logits["triton"] - ref).abs().max().item()
        assert err < 1e-4, f"step {decode_slots} + {prefill}: max abs diff {err:.2e}"
    arenas = {name: runner.arena for name, runner in runners.items()}
    for tensor in ("k", "v"):
        got, ref = getattr(arenas["triton"], tensor), getattr(arenas["reference"], tensor)
        assert (got - ref).abs().max().item() < 1e-5, f"arena {tensor} differs"


def _runners(model, kv_dtypes, slots: int = 5):
    """{(backend, kv dtype): runner} over identical arenas (odd slots far into their streams)."""
    runners = {}
    for name, backend in (("reference", REFERENCE), ("triton", triton_backend())):
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
    ([0, 1, 2, 3], []),  # decode only
    ([0, 1, 2, 3], [(4, 9)]),
    ([1, 2, 3, 4, 0], []),
    ([0, 1, 2, 3, 4], [(1, 7)]),  # slot 1 wraps its ring
    ([4, 3, 2, 1, 0], []),
]


def test_forward_with_fp8_arena_matches_reference_backend():
    """Mixed, decode-only and wrapping steps against the reference backend, with a float32 arena
    and with an fp8 arena (both backends quantising)."""
    model = _tiny_model(BASE_SEED + 700)
    runners = _runners(model, (torch.float32, FP8))
    logits = _run_steps(runners, _generator(700), STEPS)
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


def test_graph_decode_step_matches_eager_decode():
    """decode_step_tensors (decode_prep + the layers + sampling: what a CUDA graph captures)
    produces the tokens and arena state the eager reference path produces."""
    model = _tiny_model(BASE_SEED + 900)
    runners = _runners(model, (torch.float32,), slots=4)
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
