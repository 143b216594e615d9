"""The Triton attention kernels compute the reference function (sinkcache.core.attention.reference).

On a machine without CUDA they run in Triton's interpreter (tests/conftest.py turns it on before
triton is imported). Every case draws fresh random data from its own seed, poisons the output with
NaN so an unwritten element fails, and compares in float64: rel err = ||out - ref|| / ||ref||.
Tiles are small (16) so short rings still span several tiles and splits; 16 is also tl.dot's
smallest size on a GPU, where the same tests run compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

from sinkcache.core.arena import FP8
from sinkcache.core.attention import reference, triton_decode, triton_prefill
from sinkcache.core.ops import reference as ops_reference
from tests.seeds import BASE_SEED, replay_hint

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _generator(case: int) -> torch.Generator:
    torch.manual_seed(BASE_SEED + case)
    return torch.Generator().manual_seed(BASE_SEED + case)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def _assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    case: int,
    tolerance: float | None = None,
) -> None:
    where = f"(seed {BASE_SEED + case}; {replay_hint()})"
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    assert out.dtype == ref.dtype == dtype
    assert torch.isfinite(out).all(), f"unwritten (NaN-poisoned) or non-finite outputs {where}"
    err = _rel_err(out, ref)
    assert err < tolerance, f"rel err {err:.3e} >= {tolerance} {where}"


def _arena(slots: int, kv_heads: int, capacity: int, dim: int, dtype: torch.dtype, gen):
    """K, V [slots, Hkv, C, D], random everywhere (also past `seen`, where nothing may be read)."""
    shape = (slots, kv_heads, capacity, dim)
    k = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    v = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    return k, v


def _queries(tokens: int, heads: int, dim: int, dtype: torch.dtype, gen, strided: bool):
    """q, q_sink [T, H, D]; `strided` makes them views of a wider tensor, like a fused qkv."""
    width = 3 if strided else 1
    qkv = torch.randn((tokens, heads * width, dim), generator=gen).to(DEVICE, dtype)
    q_sink = torch.randn((tokens, heads, dim), generator=gen).to(DEVICE, dtype)
    return qkv[:, :heads], q_sink


# ----------------------------------------------------------------------------------------------
# decode

# (G, Hkv, D, S, W, dtype, num_splits, use_dot); num_splits None = the host's own plan.
DECODE_CASES = [
    (1, 2, 16, 0, 8, torch.float32, None, True),
    (3, 2, 16, 4, 13, torch.float32, 2, True),
    (4, 1, 64, 1, 32, torch.float32, 3, True),
    (3, 1, 16, 4, 32, torch.float32, 1, False),
    (4, 2, 16, 0, 13, torch.float32, 2, False),
    (1, 1, 64, 4, 13, torch.bfloat16, 2, True),
    (3, 2, 16, 1, 32, torch.bfloat16, 3, True),
    (4, 1, 64, 4, 8, torch.bfloat16, None, False),
    (4, 2, 16, 0, 32, torch.float16, 2, True),
    (3, 1, 128, 4, 32, torch.bfloat16, 2, True),
    (3, 1, 16, 20, 13, torch.float32, 2, True),  # sinks span two tiles
    (1, 2, 32, 1, 32, torch.float16, 1, True),
    (3, 1, 16, 4, 1, torch.float32, 2, True),  # a ring of one
]


def _decode_seen(batch: int, sink: int, capacity: int, gen) -> torch.Tensor:
    """seen [B] cycling through fill levels: 1, < S, == S, S < seen < C, == C, >> C."""
    levels = [
        1,
        max(1, sink - 1),
        max(1, sink),
        int(torch.randint(sink + 1, max(capacity, sink + 2), (1,), generator=gen)),
        capacity,
        int(torch.randint(capacity + 1, 100 * capacity, (1,), generator=gen)),
    ]
    return torch.tensor([levels[b % len(levels)] for b in range(batch)], dtype=torch.int64)


@pytest.mark.parametrize(
    ("group", "kv_heads", "dim", "sink", "window", "dtype", "num_splits", "use_dot"), DECODE_CASES
)
def test_decode_matches_reference(group, kv_heads, dim, sink, window, dtype, num_splits, use_dot):
    case = DECODE_CASES.index((group, kv_heads, dim, sink, window, dtype, num_splits, use_dot))
    gen = _generator(case)
    capacity, batch, heads = sink + window, 7, group * kv_heads
    k_cache, v_cache = _arena(batch + 5, kv_heads, capacity, dim, dtype, gen)
    slots = torch.randperm(batch + 5, generator=gen)[:batch].to(DEVICE)
    seen = _decode_seen(batch, sink, capacity, gen).to(DEVICE)
    q, q_sink = _queries(batch, heads, dim, dtype, gen, strided=case % 2 == 1)
    scale = dim**-0.5

    out = torch.full((batch, heads, dim), float("nan"), device=DEVICE, dtype=dtype)
    triton_decode.decode_attention_launch(
        q, q_sink, k_cache, v_cache, slots, seen, sink, scale,
        block_n=16, num_splits=num_splits, use_dot=use_dot, out=out, poison_partials=True,
    )  # fmt: skip
    ref = reference.decode_attention(q, q_sink, k_cache, v_cache, slots, seen, sink, scale)
    _assert_close(out, ref, dtype, case)


def test_decode_public_entry_point_and_int32_slots():
    """decode_attention itself, with its own tile and split choices, on int32 slot indices."""
    gen = _generator(100)
    group, kv_heads, dim, sink, window, batch = 3, 2, 64, 4, 40, 5
    capacity, heads = sink + window, group * kv_heads
    k_cache, v_cache = _arena(9, kv_heads, capacity, dim, torch.bfloat16, gen)
    slots = torch.randperm(9, generator=gen)[:batch].to(DEVICE, torch.int32)
    seen = _decode_seen(batch, sink, capacity, gen).to(DEVICE)
    q, q_sink = _queries(batch, heads, dim, torch.bfloat16, gen, strided=False)
    out = triton_decode.decode_attention(q, q_sink, k_cache, v_cache, slots, seen, sink, 0.125)
    ref = reference.decode_attention(q, q_sink, k_cache, v_cache, slots, seen, sink, 0.125)
    _assert_close(out, ref, torch.bfloat16, 100)


def test_split_plan_follows_batch_and_capacity():
    """Few programs split the cache to fill the SMs; a full wave of programs does not."""
    plan = triton_decode.plan_splits
    assert plan(1, 8, 2048, 4, 64, 132) > 8  # 8 programs: many splits
    assert plan(16, 3, 2048, 4, 128, 132) > 2  # 48 programs
    assert plan(16, 8, 2048, 4, 64, 132) == 2  # 128 programs: one more wave, no more
    assert plan(24, 8, 2048, 4, 64, 132) == 1  # 192 programs
    assert plan(1024, 8, 2048, 4, 64, 132) == 1
    assert plan(1, 1, 64, 4, 64, 132) == 1  # no recent tile past the sink tile: nothing to split
    assert plan(1, 1, 1 << 20, 0, 64, 132) == triton_decode.MAX_SPLITS


# ----------------------------------------------------------------------------------------------
# prefill

# (G, Hkv, D, S, W, dtype, rows as (chunk length, seen after the chunk)); 0-length rows included.
PREFILL_CASES = [
    (1, 2, 16, 0, 8, torch.float32, [(8, 8), (0, 5), (1, 9), (8, 40)]),
    (3, 2, 16, 4, 13, torch.float32, [(5, 5), (13, 17), (0, 30), (1, 100), (13, 14)]),
    (4, 1, 64, 1, 32, torch.float32, [(32, 33), (7, 1000), (1, 1), (0, 3)]),
    (3, 1, 16, 4, 32, torch.bfloat16, [(32, 32), (3, 3), (20, 70), (1, 36)]),
    (4, 2, 16, 0, 13, torch.float16, [(13, 13), (6, 21), (0, 1), (1, 2)]),
    (1, 1, 64, 4, 8, torch.bfloat16, [(8, 12), (2, 2), (8, 4_000_000_000)]),  # counters past 2^31
    (3, 1, 128, 4, 32, torch.bfloat16, [(32, 100), (17, 17)]),
    (4, 1, 16, 20, 13, torch.float32, [(13, 13), (13, 40), (4, 22), (1, 34)]),  # 2 sink tiles
    (3, 1, 16, 4, 1, torch.float32, [(1, 1), (1, 5), (0, 9), (1, 77)]),  # a ring of one
]


@pytest.mark.parametrize(
    ("group", "kv_heads", "dim", "sink", "window", "dtype", "rows"), PREFILL_CASES
)
def test_prefill_matches_reference(group, kv_heads, dim, sink, window, dtype, rows):
    case = 200 + PREFILL_CASES.index((group, kv_heads, dim, sink, window, dtype, rows))
    gen = _generator(case)
    capacity, heads = sink + window, group * kv_heads
    lengths = [length for length, _ in rows]
    assert all(length <= min(window, seen) for length, seen in rows)
    k_cache, v_cache = _arena(len(rows) + 4, kv_heads, capacity, dim, dtype, gen)
    row_slots = torch.randperm(len(rows) + 4, generator=gen)[: len(rows)].to(DEVICE)
    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(DEVICE, torch.int32)
    row_seen = torch.tensor([seen for _, seen in rows], dtype=torch.int64).to(DEVICE)
    q, q_sink = _queries(sum(lengths), heads, dim, dtype, gen, strided=case % 2 == 1)
    scale = dim**-0.5
    args = (k_cache, v_cache, row_slots, cu_seqlens, row_seen, sink, window, scale)

    out = torch.full((sum(lengths), heads, dim), float("nan"), device=DEVICE, dtype=dtype)
    triton_prefill.prefill_attention_launch(q, q_sink, *args, block_m=16, block_n=16, out=out)
    ref = reference.prefill_attention(q, q_sink, *args)
    _assert_close(out, ref, dtype, case)


def test_prefill_public_entry_point():
    """prefill_attention itself, with its own tiles: one full window, one token, one empty row."""
    gen = _generator(300)
    group, kv_heads, dim, sink, window = 4, 2, 64, 4, 24
    capacity, heads, rows = sink + window, group * kv_heads, [(24, 24), (1, 500), (0, 7), (9, 40)]
    lengths = [length for length, _ in rows]
    k_cache, v_cache = _arena(6, kv_heads, capacity, dim, torch.bfloat16, gen)
    row_slots = torch.randperm(6, generator=gen)[: len(rows)].to(DEVICE)
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(DEVICE)
    row_seen = torch.tensor([seen for _, seen in rows]).to(DEVICE)
    q, q_sink = _queries(sum(lengths), heads, dim, torch.bfloat16, gen, strided=False)
    args = (k_cache, v_cache, row_slots, cu_seqlens, row_seen, sink, window, 0.125)
    out = triton_prefill.prefill_attention(q, q_sink, *args)
    _assert_close(out, reference.prefill_attention(q, q_sink, *args), torch.bfloat16, 300)


# ----------------------------------------------------------------------------------------------
# fp8 arena: e4m3 codes with a float32 scale per token and head, read by both kernels

# Both kernels and the reference see the same codes and scales, so only summation order differs.
FP8_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _fp8_arena(shape, gen):
    """K, V codes [N, Hkv, C, D] of random values (keys with a larger range) and their scales."""
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    k_codes, k_scale = ops_reference.quantize_fp8(k * 3.0)
    v_codes, v_scale = ops_reference.quantize_fp8(v)
    return k_codes.to(DEVICE), v_codes.to(DEVICE), k_scale.to(DEVICE), v_scale.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_decode_matches_reference(dtype, num_splits):
    case = 500 + num_splits + (dtype == torch.bfloat16)
    gen = _generator(case)
    group, kv_heads, dim, sink, window, batch = 4, 2, 32, 4, 44, 6
    heads, capacity = group * kv_heads, sink + window
    k_cache, v_cache, k_scale, v_scale = _fp8_arena((batch + 2, kv_heads, capacity, dim), gen)
    assert k_cache.dtype == FP8
    slots = torch.randperm(batch + 2, generator=gen)[:batch].to(DEVICE)
    seen = torch.tensor([1, 3, 4, 20, 48, 5000], device=DEVICE)
    q = torch.randn((batch, heads, dim), generator=gen).to(DEVICE, dtype)
    q_sink = torch.randn((batch, heads, dim), generator=gen).to(DEVICE, dtype)
    ref = reference.decode_attention(
        q, q_sink, k_cache, v_cache, slots, seen, sink, 0.2, k_scale, v_scale
    )
    out = torch.full_like(ref, float("nan"))
    triton_decode.decode_attention_launch(
        q, q_sink, k_cache, v_cache, slots, seen, sink, 0.2, k_scale=k_scale, v_scale=v_scale,
        block_n=16, num_splits=num_splits, out=out, poison_partials=True,
    )  # fmt: skip
    _assert_close(out, ref, dtype, case, FP8_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_prefill_matches_reference(dtype):
    case = 600 + (dtype == torch.bfloat16)
    gen = _generator(case)
    group, kv_heads, dim, sink, window = 2, 2, 32, 4, 28
    heads, capacity = group * kv_heads, sink + window
    rows = [(28, 28), (5, 5), (0, 9), (7, 300)]  # (chunk length, seen after it)
    lengths = [n for n, _ in rows]
    k_cache, v_cache, k_scale, v_scale = _fp8_arena((6, kv_heads, capacity, dim), gen)
    row_slots = torch.randperm(6, generator=gen)[: len(rows)].to(DEVICE)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(DEVICE)
    row_seen = torch.tensor([s for _, s in rows]).to(DEVICE)
    q = torch.randn((sum(lengths), heads, dim), generator=gen).to(DEVICE, dtype)
    q_sink = torch.randn((sum(lengths), heads, dim), generator=gen).to(DEVICE, dtype)
    args = (k_cache, v_cache, row_slots, cu, row_seen, sink, window, 0.2)
    ref = reference.prefill_attention(q, q_sink, *args, k_scale, v_scale)
    out = torch.full_like(ref, float("nan"))
    triton_prefill.prefill_attention_launch(
        q, q_sink, *args, k_scale=k_scale, v_scale=v_scale, block_m=16, block_n=16, out=out
    )
    _assert_close(out, ref, dtype, case, FP8_TOLERANCE[dtype])


# ----------------------------------------------------------------------------------------------
# random shapes: each case draws its own geometry, fill levels and launch choices


def _random_geometry(gen) -> tuple[int, int, int, int, int, torch.dtype]:
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    group, kv_heads, dim = pick([1, 2, 3, 4, 8]), pick([1, 2]), pick([16, 32, 64])
    sink, window = pick([0, 1, 4, 17]), int(torch.randint(1, 41, (1,), generator=gen))
    return group, kv_heads, dim, sink, window, pick(list(TOLERANCE))


@pytest.mark.parametrize("draw", range(12))
def test_decode_random_shapes(draw):
    case = 1000 + draw
    gen = _generator(case)
    group, kv_heads, dim, sink, window, dtype = _random_geometry(gen)
    capacity, heads, batch = (
        sink + window,
        group * kv_heads,
        int(torch.randint(1, 9, (1,), generator=gen)),
    )
    k_cache, v_cache = _arena(batch + 3, kv_heads, capacity, dim, dtype, gen)
    slots = torch.randperm(batch + 3, generator=gen)[:batch].to(DEVICE)
    seen = torch.randint(1, 3 * capacity + 2, (batch,), generator=gen).to(DEVICE)
    q, q_sink = _queries(batch, heads, dim, dtype, gen, strided=draw % 2 == 0)
    num_splits = int(torch.randint(1, 5, (1,), generator=gen))
    out = torch.full((batch, heads, dim), float("nan"), device=DEVICE, dtype=dtype)
    triton_decode.decode_attention_launch(
        q, q_sink, k_cache, v_cache, slots, seen, sink, 0.3,
        block_n=16 * (1 + draw % 2), num_splits=num_splits, out=out, poison_partials=True,
    )  # fmt: skip
    ref = reference.decode_attention(q, q_sink, k_cache, v_cache, slots, seen, sink, 0.3)
    _assert_close(out, ref, dtype, case)


@pytest.mark.parametrize("draw", range(12))
def test_prefill_random_shapes(draw):
    case = 2000 + draw
    gen = _generator(case)
    group, kv_heads, dim, sink, window, dtype = _random_geometry(gen)
    capacity, heads, rows = (
        sink + window,
        group * kv_heads,
        int(torch.randint(1, 5, (1,), generator=gen)),
    )
    row_seen = torch.randint(1, 3 * capacity + 2, (rows,), generator=gen)
    lengths = [
        int(torch.randint(0, min(window, s) + 1, (1,), generator=gen)) for s in row_seen.tolist()
    ]
    if sum(lengths) == 0:
        lengths[0] = 1
    k_cache, v_cache = _arena(rows + 3, kv_heads, capacity, dim, dtype, gen)
    row_slots = torch.randperm(rows + 3, generator=gen)[:rows].to(DEVICE)
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(DEVICE)
    q, q_sink = _queries(sum(lengths), heads, dim, dtype, gen, strided=draw % 2 == 0)
    args = (k_cache, v_cache, row_slots, cu_seqlens, row_seen.to(DEVICE), sink, window, 0.3)
    out = torch.full((sum(lengths), heads, dim), float("nan"), device=DEVICE, dtype=dtype)
    triton_prefill.prefill_attention_launch(
        q, q_sink, *args, block_m=16 * (1 + draw % 2), block_n=16 * (1 + draw // 6), out=out
    )
    _assert_close(out, reference.prefill_attention(q, q_sink, *args), dtype, case)


def test_interpreter_is_on_without_cuda():
    """Without CUDA the kernels can only run interpreted; fail loudly if conftest did not say so."""
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
