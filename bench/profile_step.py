"""Where a decode step's GPU time goes: a torch-profiler pass over N replays of the step's graph.

For each (model shape, sessions, variant, kv dtype) it builds the decoding engine engine_bench
builds (every slot full and wrapped, every session generating greedily), replays the captured
step N times under torch.profiler (CUDA activity only: kernels, copies, memsets), and reports per
step: the wall span (first kernel start to last kernel end, over N), the kernel time (sum of
durations), the busy time (union of the kernel intervals: programmatic dependent launch lets
kernels overlap), the gaps (wall minus busy), kernels per step and per layer, and a table of
kernels by name (count per step, time per step, share, time each). The same step's replay time
without the profiler is `graph ms`.

    python bench/profile_step.py --rows "smollm2-135m:1020:1,256;llama3-8b:1020:128" \\
        --variants unfused,fused --json profile.json
"""

from __future__ import annotations

import argparse
import gc
import json
import re
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
from engine_bench import (
    decoding_core,
    parse_rows,
    random_loaded,
    step_graph,
    time_graph,
    variant_settings,
)
from torch.profiler import ProfilerActivity, profile

from sinkcache.config import PRESETS

CATEGORIES = [  # (category, pattern on the kernel name), first match wins
    ("attention", r"_decode_split|_decode_merge|_prefill_kernel"),
    ("fused layer", r"_norm_qkv_rope|_norm_gate_up_silu|_linear_kernel"),
    ("gemm (cuBLAS)", r"nvjet|gemm|cutlass|sm90_xmma|splitK|Kernel2"),
    ("add+norm / rope+store / silu", r"_add_rms_norm|_rope_store|_silu_mul"),
    ("decode prep", r"_decode_prep"),
    ("sampling", r"argmax|_nucleus|softmax|reduce"),
]


def short_name(name: str) -> str:
    """Kernel names without template arguments, at most 90 characters."""
    return re.sub(r"<.*>", "<>", name)[:90]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name):
            return label
    return "other"


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def device_events(prof) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every device activity the profiler recorded."""
    events = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    if events:
        return events
    raw = prof.profiler.kineto_results.events()  # older/newer layouts: read Kineto directly
    return [
        (e.name(), e.start_ns() / 1000, (e.start_ns() + e.duration_ns()) / 1000)
        for e in raw
        if e.device_type() == torch.autograd.DeviceType.CUDA
    ]


def profile_graph(graph, steps: int) -> dict:
    """Replay `graph` `steps` times under the profiler; per-step figures (ms) and kernels."""
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    events = device_events(prof)
    intervals = [(start, end) for _, start, end in events]
    if not intervals:
        return {"error": "the profiler saw no CUDA activity"}
    span_us = max(end for _, end in intervals) - min(start for start, _ in intervals)
    kernel_us = sum(end - start for start, end in intervals)
    busy_us = union_length(intervals)
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, start, end in events:
        by_name[short_name(name)].append(end - start)
    kernels = [
        {
            "kernel": name,
            "category": category(name),
            "count_per_step": len(times) / steps,
            "ms_per_step": sum(times) / steps / 1000,
            "share": sum(times) / kernel_us,
            "us_each": sum(times) / len(times),
        }
        for name, times in by_name.items()
    ]
    kernels.sort(key=lambda k: -k["ms_per_step"])
    categories: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0.0, "ms": 0.0})
    for k in kernels:
        categories[k["category"]]["count"] += k["count_per_step"]
        categories[k["category"]]["ms"] += k["ms_per_step"]
    return {
        "wall_ms": span_us / steps / 1000,
        "kernel_ms": kernel_us / steps / 1000,
        "busy_ms": busy_us / steps / 1000,
        "gaps_ms": (span_us - busy_us) / steps / 1000,
        "kernels_per_step": len(events) / steps,
        "categories": dict(categories),
        "kernels": kernels,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="smollm2-135m:1020:1,256;llama3-8b:1020:128")
    parser.add_argument("--variants", default="fused")
    parser.add_argument("--kv-dtype", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per configuration")
    parser.add_argument("--json", default="profile_step.json")
    args = parser.parse_args()
    out = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name(), "runs": []}
    for preset, caches in parse_rows(args.rows).items():
        shape = PRESETS[preset]
        loaded = random_loaded(preset)
        for window, batches in caches.items():
            for batch in batches:
                for kv_dtype in args.kv_dtype.split(","):
                    for variant in args.variants.split(","):
                        try:
                            with variant_settings(variant):
                                core = decoding_core(loaded, 4, window, batch, kv_dtype)
                                graph = step_graph(core, batch)
                                graph_ms = time_graph(graph)
                                result = profile_graph(graph, args.steps)
                        except Exception as error:  # keep the other runs
                            print(f"{preset} B={batch} {variant} {kv_dtype}: FAILED {error!r}")
                            continue
                        finally:
                            core = graph = None
                            gc.collect()
                            torch.cuda.empty_cache()
                        run = {
                            "model": preset,
                            "sink": 4,
                            "window": window,
                            "sessions": batch,
                            "variant": variant,
                            "kv_dtype": kv_dtype,
                            "graph_ms": graph_ms,
                            "kernels_per_layer": result.get("kernels_per_step", 0)
                            / shape.num_layers,
                            **result,
                        }
                        out["runs"].append(run)
                        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
                        report(run, args.top)
        del loaded
        gc.collect()
        torch.cuda.empty_cache()


def report(run: dict, top: int) -> None:
    if "error" in run:
        print(run["error"])
        return
    print(
        f"\n{run['model']} 4+{run['window']} B={run['sessions']} {run['variant']} "
        f"kv={run['kv_dtype']}: graph {run['graph_ms']:.3f} ms; profiled wall "
        f"{run['wall_ms']:.3f}, kernels {run['kernel_ms']:.3f} (busy {run['busy_ms']:.3f}), gaps "
        f"{run['gaps_ms']:.3f} ms; {run['kernels_per_step']:.0f} kernels/step "
        f"({run['kernels_per_layer']:.1f}/layer)",
        flush=True,
    )
    for name, c in sorted(run["categories"].items(), key=lambda kv: -kv[1]["ms"]):
        print(f"  {name:32s} {c['count']:6.1f} kernels {c['ms']:8.3f} ms")
    for k in run["kernels"][:top]:
        print(
            f"    {k['ms_per_step']:7.3f} ms {k['count_per_step']:6.1f}x {k['us_each']:7.2f} us"
            f"  {k['share']:5.1%}  {k['kernel']}"
        )


if __name__ == "__main__":
    main()
