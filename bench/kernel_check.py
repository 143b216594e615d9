"""Check the Triton attention kernels against the reference on a GPU, then time them.

Run on the H100 from the repository root (about 25 s; `--sweep` adds a few minutes):

    PYTHONUNBUFFERED=1 python bench/kernel_check.py --json kernel_check.json

For each shape (SmolLM2-135M and Llama-3-8B heads, C in {1024, 2048}, B in {1..1024}, bf16) it
checks decode and prefill against sinkcache.core.attention.reference on fresh random data with
NaN-poisoned outputs (rel err < 1e-2, every element written) and checks that decode replays
correctly from a CUDA graph after `seen` changes in place. It then times decode over full slots,
rotating among disjoint slot sets so L2 cannot help, two ways: triton.testing.do_bench (median)
over eager calls, which includes the host's launch cost where that exceeds the kernel, and per
call from a replayed CUDA graph, which is what a graph-captured engine step pays. GB/s counts
B * Hkv * min(seen, C) * D * 2 (K, V) * 2 bytes; a large device-to-device copy (bytes read +
written) gives the bandwidth to compare with. `--sweep` also times launch variants (decode tiles,
warps, stages, dot vs broadcast, split counts; prefill tiles).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import triton
import triton.testing

from sinkcache.core.attention import reference, triton_decode, triton_prefill
from sinkcache.core.policy import key_token_counters

MODELS = {  # name: (H, Hkv, D)
    "smollm2-135m": (9, 3, 64),
    "llama3-8b": (32, 8, 128),
}
CAPACITIES = (1024, 2048)
BATCHES = (1, 16, 64, 256, 1024)
SINK = 4
DTYPE = torch.bfloat16
TOLERANCE = 1e-2
CHECK_ROWS = 64  # rows compared against the reference (rows are independent)
ROTATION_BYTES = 512 << 20  # K/V bytes the timing rotates through, at least (L2 is 50 MB)
PREFILL_CASES = ((1, 512), (4, 512), (16, 128))  # (rows, chunk length)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def check(name: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    """Every element written (no NaN from the poison) and close to the reference."""
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: output has NaN/inf (unwritten or broken)")
    err = rel_err(out, ref)
    if not err < TOLERANCE:
        raise AssertionError(f"{name}: rel err {err:.3e} >= {TOLERANCE}")
    return err


def make_arena(slots: int, kv_heads: int, capacity: int, dim: int) -> tuple[torch.Tensor, ...]:
    """K, V [slots, Hkv, C, D] of random bf16 (never zeros: they hide unwritten reads)."""
    shape = (slots, kv_heads, capacity, dim)
    k = torch.randn(shape, device="cuda", dtype=DTYPE)
    v = torch.randn(shape, device="cuda", dtype=DTYPE)
    return k, v


def mixed_seen(batch: int, capacity: int, gen: torch.Generator) -> torch.Tensor:
    """seen [B]: partial sinks, partial ring, and far past capacity, mixed."""
    choices = torch.stack(
        [
            torch.randint(1, SINK + 1, (batch,), generator=gen),
            torch.randint(SINK + 1, capacity, (batch,), generator=gen),
            torch.randint(capacity, 50 * capacity, (batch,), generator=gen),
        ]
    )
    pick = torch.randint(0, 3, (batch,), generator=gen)
    return choices.gather(0, pick[None]).squeeze(0).cuda()


def decode_case(model: str, capacity: int, batch: int, seed: int, sweep: bool) -> dict:
    heads, kv_heads, dim = MODELS[model]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    kv_bytes_per_row = kv_heads * capacity * dim * 2 * DTYPE.itemsize
    sets = max(1, min(32, math.ceil(ROTATION_BYTES / (batch * kv_bytes_per_row))))
    slots_total = batch * sets + 7  # a larger arena than the batch uses
    k_cache, v_cache = make_arena(slots_total, kv_heads, capacity, dim)
    perm = torch.randperm(slots_total, generator=gen)[: batch * sets].cuda()
    slot_sets = perm.view(sets, batch)  # disjoint slot sets to rotate through
    q = torch.randn((sets, batch, heads, dim), device="cuda", dtype=DTYPE)
    q_sink = torch.randn_like(q)
    scale = dim**-0.5

    # Correctness: mixed fill levels, poisoned output, first CHECK_ROWS rows vs the reference.
    seen = mixed_seen(batch, capacity, gen)
    out = torch.full_like(q[0], float("nan"))
    triton_decode.decode_attention_launch(
        q[0], q_sink[0], k_cache, v_cache, slot_sets[0], seen, SINK, scale, out=out
    )
    n = min(batch, CHECK_ROWS)
    ref = reference.decode_attention(
        q[0, :n], q_sink[0, :n], k_cache, v_cache, slot_sets[0, :n], seen[:n], SINK, scale
    )
    err = check(f"decode {model} C={capacity} B={batch}", out[:n], ref)
    if not torch.isfinite(out).all():
        raise AssertionError("decode: unwritten rows past the checked ones")

    # CUDA graph: capture with one seen, replay with another written in place.
    full_seen = torch.randint(capacity, 50 * capacity, (batch,), generator=gen).cuda()
    graph_seen = seen.clone()
    graph_out = torch.empty_like(q[0])
    graph = capture(
        lambda: graph_out.copy_(
            triton_decode.decode_attention(
                q[0], q_sink[0], k_cache, v_cache, slot_sets[0], graph_seen, SINK, scale
            )
        )
    )
    graph_seen.copy_(full_seen)
    graph.replay()
    ref = reference.decode_attention(
        q[0, :n], q_sink[0, :n], k_cache, v_cache, slot_sets[0, :n], full_seen[:n], SINK, scale
    )
    graph_err = check("decode graph replay", graph_out[:n], ref)

    # Timing: full slots (the steady state), rotating through the disjoint slot sets.
    def launch(i: int, **options) -> None:
        triton_decode.decode_attention_launch(
            q[i], q_sink[i], k_cache, v_cache, slot_sets[i], full_seen, SINK, scale, **options
        )

    def eager_ms(**options) -> float:
        """do_bench over eager calls: includes the host's launch cost where it exceeds the GPU's."""
        turn = itertools.cycle(range(sets))
        return bench(lambda: launch(next(turn), **options))

    def graph_ms(**options) -> float:
        """Per call, from one CUDA graph over every slot set: the kernels as a graphed step sees them."""
        graph = capture(lambda: [launch(i, **options) for i in range(sets)])
        return bench(graph.replay) / sets

    kv_bytes = batch * kv_heads * capacity * dim * 2 * DTYPE.itemsize  # every slot full
    ms, graph = eager_ms(), graph_ms()
    block_n = triton_decode.default_config(dim)["block_n"]
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    splits = triton_decode.plan_splits(batch, kv_heads, capacity, SINK, block_n, sm_count)
    record = {
        "kernel": "decode",
        "model": model,
        "capacity": capacity,
        "batch": batch,
        "splits": splits,
        "rel_err": err,
        "graph_rel_err": graph_err,
        "ms": ms,
        "graph_ms": graph,
        "kv_bytes": kv_bytes,
        "gb_per_s": kv_bytes / ms / 1e6,
        "graph_gb_per_s": kv_bytes / graph / 1e6,
    }
    if sweep:
        record["sweep"] = sweep_decode(graph_ms, kv_bytes, dim, splits)
    return record


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def capture(fn) -> torch.cuda.CUDAGraph:
    """Warm fn up on a side stream (compiles), then capture it into a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def sweep_decode(graph_ms, kv_bytes: int, dim: int, planned_splits: int) -> list[dict]:
    """Graph-time launch variants of one decode shape: tiles (planned splits), then split counts."""
    variants = [
        {"block_n": block_n, "num_warps": warps, "num_stages": stages, "use_dot": use_dot}
        for block_n, warps, stages, use_dot in itertools.product(
            (32, 64, 128), (4, 8), (2, 3, 4), (True, False)
        )
        if use_dot or block_n * dim <= 32 * 64  # the broadcast form spills past this
    ]
    variants += [{"num_splits": n} for n in (1, 2, 4, 8, 16, 32) if n != planned_splits]
    rows = []
    for options in variants:
        try:
            ms = graph_ms(**options)
        except Exception as exc:  # out of shared memory / registers for this variant
            rows.append({**options, "error": str(exc)[:200]})
            continue
        rows.append({**options, "ms": ms, "gb_per_s": kv_bytes / ms / 1e6})
    best = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])[:3]
    for r in best:
        log(f"    sweep best: {r}")
    return rows


def prefill_case(model: str, capacity: int, rows: int, length: int, seed: int, sweep: bool) -> dict:
    heads, kv_heads, dim = MODELS[model]
    window = capacity - SINK
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    k_cache, v_cache = make_arena(rows * 2 + 3, kv_heads, capacity, dim)
    slots = torch.randperm(rows * 2 + 3, generator=gen)[:rows].cuda()
    lengths = torch.full((rows,), length, dtype=torch.int64)
    # Rows deep into their streams, and (with several rows) one fresh session with a short chunk.
    row_seen = torch.randint(capacity, 50 * capacity, (rows,), generator=gen)
    if rows > 1:
        lengths[0] = max(1, length // 3)
        row_seen[0] = lengths[0]
    cu_seqlens = torch.zeros(rows + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    total = int(cu_seqlens[-1])
    q = torch.randn((total, heads, dim), device="cuda", dtype=DTYPE)
    q_sink = torch.randn_like(q)
    args = (slots, cu_seqlens.cuda(), row_seen.cuda(), SINK, window, dim**-0.5)

    out = torch.full_like(q, float("nan"))
    triton_prefill.prefill_attention_launch(q, q_sink, k_cache, v_cache, *args, out=out)
    ref = reference.prefill_attention(q, q_sink, k_cache, v_cache, *args)
    err = check(f"prefill {model} C={capacity} rows={rows} L={length}", out, ref)

    def launch(**options) -> None:
        triton_prefill.prefill_attention_launch(q, q_sink, k_cache, v_cache, *args, **options)

    def graph_ms(**options) -> float:
        return bench(capture(lambda: launch(**options)).replay)

    ms, graph = bench(launch), graph_ms()
    flops = 4 * heads * dim * visible_pairs(lengths, row_seen, window)  # QK and PV
    record = {
        "kernel": "prefill",
        "model": model,
        "capacity": capacity,
        "rows": rows,
        "length": length,
        "tokens": total,
        "rel_err": err,
        "ms": ms,
        "graph_ms": graph,
        "tflop_per_s": flops / graph / 1e9,
    }
    if sweep:
        record["sweep"] = sweep_prefill(graph_ms, flops)
    return record


def visible_pairs(lengths: torch.Tensor, row_seen: torch.Tensor, window: int) -> int:
    """(query, key) pairs the causal mask lets through: the work attention must do."""
    counters = key_token_counters(row_seen, SINK, window)  # [R, C], -1 where empty
    pairs = 0
    for length, seen, key_t in zip(lengths.tolist(), row_seen.tolist(), counters, strict=True):
        query_t = torch.arange(seen - length, seen)[:, None]  # [L, 1]
        pairs += int(((key_t[None, :] >= 0) & (key_t[None, :] <= query_t)).sum())
    return pairs


def sweep_prefill(graph_ms, flops: int) -> list[dict]:
    """Graph-time prefill tile variants; each row says TFLOP/s over visible pairs."""
    rows = []
    for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64), (4, 8), (2, 3)):
        options = {"block_m": block_m, "block_n": block_n, "num_warps": warps, "num_stages": stages}
        try:
            ms = graph_ms(**options)
        except Exception as exc:  # out of shared memory / registers for this variant
            rows.append({**options, "error": str(exc)[:200]})
            continue
        rows.append({**options, "ms": ms, "tflop_per_s": flops / ms / 1e9})
    best = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])[:3]
    for r in best:
        log(f"    sweep best: {r}")
    return rows


def copy_bandwidth() -> dict:
    """A large device-to-device copy, counting bytes read plus bytes written."""
    nbytes = 2 << 30
    src = torch.randint(0, 255, (nbytes,), device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return {"kernel": "copy", "bytes": 2 * nbytes, "ms": ms, "gb_per_s": 2 * nbytes / ms / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, help="write all records here")
    parser.add_argument("--sweep", action="store_true", help="also time launch variants")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    parser.add_argument("--capacities", nargs="*", type=int, default=list(CAPACITIES))
    parser.add_argument("--kernels", nargs="*", default=["decode", "prefill"])
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_check needs a CUDA GPU")
    device = torch.cuda.get_device_properties(0)
    log(f"{device.name}: {device.multi_processor_count} SMs")
    log(f"torch {torch.__version__}, triton {triton.__version__}")

    copy = copy_bandwidth()
    log(f"device copy: {copy['gb_per_s']:.0f} GB/s (read + write)")
    records = [copy]
    seed = int(time.time())
    log(f"seed {seed}")
    for model, capacity, batch in itertools.product(opts.models, opts.capacities, opts.batches):
        if "decode" not in opts.kernels:
            break
        seed += 1
        rec = decode_case(model, capacity, batch, seed, opts.sweep)
        torch.cuda.empty_cache()
        records.append(rec)
        log(
            f"decode {model} C={capacity} B={batch} splits={rec['splits']} err={rec['rel_err']:.1e} "
            f"eager {rec['ms'] * 1e3:.1f} us, graph {rec['graph_ms'] * 1e3:.1f} us"
        )
    for model, capacity, (rows, length) in itertools.product(
        opts.models, opts.capacities, PREFILL_CASES
    ):
        if "prefill" not in opts.kernels:
            break
        seed += 1
        rec = prefill_case(model, capacity, rows, length, seed, opts.sweep)
        torch.cuda.empty_cache()
        records.append(rec)
        log(
            f"prefill {model} C={capacity} rows={rows} L={length} err={rec['rel_err']:.1e} "
            f"eager {rec['ms'] * 1e3:.1f} us, graph {rec['graph_ms'] * 1e3:.1f} us"
        )
    print_tables(records, copy["gb_per_s"])
    print("all checks passed", flush=True)
    if opts.json:
        opts.json.write_text(json.dumps({"device": device.name, "records": records}, indent=1))
        log(f"wrote {opts.json}")


def print_tables(records: list[dict], copy_gb_per_s: float) -> None:
    """Decode: eager do_bench and CUDA-graph times, GB/s of valid K/V read; prefill: times."""
    print(f"\ndecode, {DTYPE}, full slots; device copy {copy_gb_per_s:.0f} GB/s (read + write)")
    print(
        f"{'model':14s}{'C':>6s}{'B':>6s}{'splits':>7s}{'eager us':>10s}{'GB/s':>7s}"
        f"{'graph us':>10s}{'GB/s':>7s}{'% copy':>8s}"
    )
    for r in records:
        if r["kernel"] == "decode":
            print(
                f"{r['model']:14s}{r['capacity']:6d}{r['batch']:6d}{r['splits']:7d}"
                f"{r['ms'] * 1e3:10.1f}{r['gb_per_s']:7.0f}{r['graph_ms'] * 1e3:10.1f}"
                f"{r['graph_gb_per_s']:7.0f}{100 * r['graph_gb_per_s'] / copy_gb_per_s:8.0f}"
            )
    print(f"\nprefill, {DTYPE}; TFLOP/s over the (query, key) pairs the causal mask lets through")
    print(
        f"{'model':14s}{'C':>6s}{'rows':>6s}{'L':>6s}{'eager us':>10s}{'graph us':>10s}{'TFLOP/s':>9s}"
    )
    for r in records:
        if r["kernel"] == "prefill":
            print(
                f"{r['model']:14s}{r['capacity']:6d}{r['rows']:6d}{r['length']:6d}"
                f"{r['ms'] * 1e3:10.1f}{r['graph_ms'] * 1e3:10.1f}{r['tflop_per_s']:9.1f}"
            )


if __name__ == "__main__":
    main()
