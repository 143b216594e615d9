"""Launch-shape sweeps, timed as what the engine runs: the replay of a whole decode step's graph.

One decoding engine per (shape, sessions, kv dtype) (engine_bench's set-up); for each candidate the
step's graph is captured again with that candidate's launch options and its replay timed. Linear
candidates set sinkcache.core.ops.triton_linear.CONFIG_OVERRIDE (all four whole-layer kernels);
decode candidates set triton_decode.DECODE_CONFIG_OVERRIDE.

    python bench/fused_sweep.py --rows "smollm2-135m:1020:1,256" --sweep linear --json sweep.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from datetime import date
from pathlib import Path

import torch
from engine_bench import decoding_core, parse_rows, random_loaded, step_graph, time_graph

from sinkcache.core.attention import triton_decode
from sinkcache.core.ops import triton_linear

KINDS = ("qkv", "gate_up", "o_proj", "down")
LINEAR = {
    "default": {},
    "n32": {"block_n": 32},
    "n64": {"block_n": 64},
    "k64": {"block_k": 64},
    "k256": {"block_k": 256},
    "s2": {"num_stages": 2},
    "s4": {"num_stages": 4},
    "w2": {"num_warps": 2},
    "w8": {"num_warps": 8},
    "m32": {"block_m": 32},
    "m64": {"block_m": 64},
}
DECODE = {
    "default": {},
    "w8": {"num_warps": 8},
    "n256": {"block_n": 256},
    "s4": {"num_stages": 4},
    "n64": {"block_n": 64},
    "s2": {"num_stages": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="smollm2-135m:1020:1,256")
    parser.add_argument("--sweep", default="linear", choices=("linear", "decode"))
    parser.add_argument("--kv-dtype", default="auto")
    parser.add_argument("--fused-rows", type=int, default=1 << 30, help="SINKSERVE_FUSED_ROWS")
    parser.add_argument("--budget-s", type=float, default=120, help="stop starting candidates")
    parser.add_argument("--json", default="fused_sweep.json")
    args = parser.parse_args()
    os.environ["SINKSERVE_FUSED_ROWS"] = str(args.fused_rows)
    started = time.perf_counter()
    out = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name(), "runs": []}
    candidates = LINEAR if args.sweep == "linear" else DECODE
    for preset, caches in parse_rows(args.rows).items():
        loaded = random_loaded(preset)
        for window, batches in caches.items():
            for batch in batches:
                core = decoding_core(loaded, 4, window, batch, args.kv_dtype)
                for name, options in candidates.items():
                    if time.perf_counter() - started > args.budget_s:
                        print("sweep budget spent")
                        break
                    if args.sweep == "linear":
                        triton_linear.CONFIG_OVERRIDE.clear()
                        triton_linear.CONFIG_OVERRIDE.update({k: options for k in KINDS})
                    else:
                        triton_decode.DECODE_CONFIG_OVERRIDE.clear()
                        triton_decode.DECODE_CONFIG_OVERRIDE.update(options)
                    try:
                        core.runner._graphs.clear()
                        core.runner._graph_pool = None  # a fresh pool: the old graphs are gone
                        core.step()  # captures this bucket's graph with the candidate
                        core.step()
                        torch.cuda.synchronize()
                        graph_ms = time_graph(step_graph(core, batch))
                    except Exception as error:
                        print(f"{preset} B={batch} {name}: FAILED {error!r}", flush=True)
                        continue
                    run = {
                        "model": preset,
                        "window": window,
                        "sessions": batch,
                        "kv_dtype": args.kv_dtype,
                        "sweep": args.sweep,
                        "candidate": name,
                        "options": options,
                        "graph_ms": graph_ms,
                    }
                    out["runs"].append(run)
                    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
                    print(
                        f"{preset} 4+{window} B={batch} kv={args.kv_dtype} {args.sweep} "
                        f"{name:8s} graph {graph_ms:.4f} ms",
                        flush=True,
                    )
                triton_linear.CONFIG_OVERRIDE.clear()
                triton_decode.DECODE_CONFIG_OVERRIDE.clear()
                del core
                gc.collect()
                torch.cuda.empty_cache()
        del loaded


if __name__ == "__main__":
    main()
