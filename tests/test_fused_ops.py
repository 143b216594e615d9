"""The fused Triton ops compute the reference ops (sinkcache.core.ops.reference), and the model forward
with the Triton backend computes what it computes with the reference backend.

On a machine without CUDA the kernels run in Triton's interpreter (tests/conftest.py). Every case
draws fresh random data from its own seed, poisons the outputs with NaN so an unwritten element
fails, and checks that arena positions nobody writes keep their bits. float32: max abs error
<= 1e-5 (scaled by the largest reference magnitude when above 1); bf16 / fp16: rel err < 1e-2.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

from sinkcache.config import CacheGeometry, ModelShape
from sinkcache.core.arena import KVArena
from sinkcache.core.attention.backend import REFERENCE, triton_backend
from sinkcache.core.model import Transformer
from sinkcache.core.ops import reference, triton_fused
from sinkcache.core.plan import PrefillChunk, StepPlan
from sinkcache.core.runner import ModelRunner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A fresh base seed per run (printed with any failure); set SINKSERVE_TEST_SEED to replay one.
BASE_SEED = int(os.environ.get("SINKSERVE_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
DTYPES = (torch.float32, torch.bfloat16)


def _generator(case: int) -> torch.Generator:
    return torch.Generator().manual_seed(BASE_SEED + case)


def _where(case: int) -> str:
    return f"(seed {BASE_SEED + case}; replay with SINKSERVE_TEST_SEED={BASE_SEED})"


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
        # The reference rounds twice (normalised -> bf16, then * weight -> bf16); so does the
        # kernel, so only float32 summation order can flip a rounding: allow rare 1-ulp flips.
        diff = (normed.double() - ref_normed.double()).abs()
        ulp = ref_normed.double().abs() * 2.0**-7
        assert (diff <= ulp + 1e-30).all(), f"bf16 norm off by more than 1 ulp {_where(case)}"
        same = (normed == ref_normed).double().mean().item()
        assert same >= 0.99, f"only {same:.2%} bit-equal to the reference {_where(case)}"


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
