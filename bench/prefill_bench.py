"""Prefill: time to first token under decode load, tokens/s against the compute roofline, and what
a CUDA graph would save on a prefill forward.

1. TTFT: B sessions decode (engine_bench's set-up: full, wrapped slots), then a new session appends
   1,020 tokens and asks for one token; engine-side time from `submit` to the token's event (the
   step that prefills it, and the next, which applies its output), median of the repeats.
2. Throughput: S empty sessions each append 1,020 tokens (one token generated each); prefill
   tokens/s over the whole batch at two per-step token budgets, against the bf16 matrix rate
   measured in the same run (8192^3 products): FLOPs count every matmul (2 per weight per token,
   the LM head for sampled tokens only) and causal attention (4 H D per key and query).
3. Graph vs eager: the same prefill forward (fixed chunks) run eagerly, with its host enqueue time,
   and replayed from a captured CUDA graph: the most that graphing prefill steps could save.

    python bench/prefill_bench.py --json prefill.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from datetime import date
from pathlib import Path

import torch
from engine_bench import decoding_core, random_loaded

from sinkcache.config import EngineConfig, ModelShape
from sinkcache.core.plan import PrefillChunk
from sinkcache.events import TokensEvent, TurnEndEvent
from sinkcache.host.builder import build_core
from sinkcache.inputs import GenerationParams, TokenInput

ONE_TOKEN = GenerationParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)


class _FirstToken:
    def __init__(self) -> None:
        self.first: float | None = None
        self.done = False

    def push(self, event) -> None:
        if isinstance(event, TokensEvent) and self.first is None:
            self.first = time.perf_counter()
        elif isinstance(event, TurnEndEvent):
            self.done = True

    def fail(self, error) -> None:
        raise error


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * 8192**3 / sorted(times)[5] / 1e12


def prefill_flops(shape: ModelShape, length: int, capacity: int) -> float:
    """FLOPs of one chunk of `length` tokens into an empty slot, sampling its last token."""
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    per_token = 2 * (
        h * (shape.num_heads + 2 * shape.num_kv_heads) * d  # qkv
        + shape.num_heads * d * h  # o
        + 3 * h * i  # gate, up, down
    )
    keys = sum(min(q + 1, capacity) for q in range(length))  # causal, from an empty slot
    attention = 4 * shape.num_heads * d * keys
    return shape.num_layers * (length * per_token + attention) + 2 * h * shape.vocab_size


def ttft_under_decode(loaded, sessions: int, prompt: int, repeats: int) -> dict:
    core = decoding_core(loaded, 4, 1020, sessions, spare=1)
    for _ in range(5):
        core.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        core.step()
    torch.cuda.synchronize()
    decode_ms = (time.perf_counter() - start) / 20 * 1000
    rng = random.Random(0)
    ttfts, steps_taken = [], []
    # Repeat 0 is thrown away: it compiles the prefill kernels for this length and captures the
    # graph of the decode batch the new session joins (a serving engine has both already).
    for r in range(repeats + 1):
        name = f"prompt{r}"
        core.open_session(name)
        sink = _FirstToken()
        ids = tuple(rng.randrange(1000) for _ in range(prompt))
        begin = time.perf_counter()
        core.submit(name, TokenInput(ids), ONE_TOKEN, False, sink)
        steps = 0
        while sink.first is None:
            core.step()
            steps += 1
        if r > 0:
            ttfts.append((sink.first - begin) * 1000)
            steps_taken.append(steps)
        while not sink.done:
            core.step()
        core.close(name)
        for _ in range(3):
            core.step()
    del core
    gc.collect()
    torch.cuda.empty_cache()
    ttfts.sort()
    return {
        "decoding_sessions": sessions,
        "prompt_tokens": prompt,
        "decode_step_ms": decode_ms,
        "ttft_ms_median": ttfts[len(ttfts) // 2],
        "ttft_ms_all": ttfts,
        "steps_to_first_token": steps_taken,
    }


def prefill_throughput(loaded, sessions: int, prompt: int, budget: int, flops_rate: float) -> dict:
    config = EngineConfig(
        model=loaded.name,
        sink=4,
        window=1020,
        slots=sessions,
        cuda_graphs=True,
        prefill_budget=budget,
    )
    core = build_core(config, loaded, warm_up=False)
    rng = random.Random(1)
    result = {}
    for round_ in ("warm-up", "timed"):
        sinks = []
        for s in range(sessions):
            name = f"{round_}{s}"
            core.open_session(name)
            sink = _FirstToken()
            ids = tuple(rng.randrange(1000) for _ in range(prompt))
            core.submit(name, TokenInput(ids), ONE_TOKEN, False, sink)
            sinks.append((name, sink))
        torch.cuda.synchronize()
        begin = time.perf_counter()
        steps = 0
        while not all(sink.done for _, sink in sinks):
            core.step()
            steps += 1
        torch.cuda.synchronize()
        seconds = time.perf_counter() - begin
        for name, _ in sinks:
            core.close(name)
        flops = sessions * prefill_flops(loaded.shape, prompt, 1024)
        result = {
            "sessions": sessions,
            "prompt_tokens": prompt,
            "prefill_budget": budget,
            "steps": steps,
            "seconds": seconds,
            "tokens_per_s": sessions * prompt / seconds,
            "tflops": flops / seconds / 1e12,
            "pct_of_matmul_rate": 100 * flops / seconds / 1e12 / flops_rate,
        }
    del core
    gc.collect()
    torch.cuda.empty_cache()
    return result


def graph_vs_eager(loaded, rows: int, prompt: int) -> dict:
    """One prefill forward of `rows` chunks of `prompt` tokens: eager (wall and host enqueue) and
    from a captured CUDA graph."""
    config = EngineConfig(model=loaded.name, sink=4, window=1020, slots=rows, cuda_graphs=True)
    core = build_core(config, loaded, warm_up=False)
    runner, arena = core.runner, core.arena
    slots = [arena.allocate() for _ in range(rows)]
    rng = random.Random(2)
    chunks = [PrefillChunk(slot, [rng.randrange(1000) for _ in range(prompt)], 0) for slot in slots]
    no_decode = torch.empty(0, dtype=torch.int64, device="cuda")
    batch, _, _ = runner._build_batch(no_decode, chunks)
    model, backend = runner.model, runner.attention
    for _ in range(3):
        model(batch, arena, backend)
    torch.cuda.synchronize()
    walls, hosts = [], []
    for _ in range(10):
        begin = time.perf_counter()
        model(batch, arena, backend)
        hosts.append((time.perf_counter() - begin) * 1000)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - begin) * 1000)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model(batch, arena, backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(batch, arena, backend)
    replays = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        replays.append(start.elapsed_time(end))
    del graph, core
    gc.collect()
    torch.cuda.empty_cache()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "rows": rows,
        "prompt_tokens": prompt,
        "eager_ms": med(walls),
        "eager_host_enqueue_ms": med(hosts),
        "graph_ms": med(replays),
        "graph_saves_pct": 100 * (1 - med(replays) / med(walls)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="prefill_bench.json")
    parser.add_argument("--models", default="smollm2-135m,llama3-8b")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rate = matmul_tflops()
    out = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "matmul_tflops_bf16": rate,
        "ttft": [],
        "throughput": [],
        "graph_vs_eager": [],
    }
    print(f"{out['device']}: bf16 8192^3 matmul {rate:.0f} TFLOP/s", flush=True)

    def save() -> None:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")

    plans = {
        "smollm2-135m": {"ttft": [256], "throughput": [(32, 2048), (32, 8192)], "graph": [1, 2]},
        "llama3-8b": {"ttft": [], "throughput": [(16, 8192)], "graph": [2]},
    }
    for preset in args.models.split(","):
        plan = plans[preset]
        loaded = random_loaded(preset)
        for sessions in plan["ttft"]:
            row = {"model": preset, **ttft_under_decode(loaded, sessions, 1020, args.repeats)}
            out["ttft"].append(row)
            save()
            print(
                f"{preset}: TTFT of a 1020-token append while {sessions} sessions decode: "
                f"{row['ttft_ms_median']:.2f} ms (decode step {row['decode_step_ms']:.3f} ms, "
                f"steps {row['steps_to_first_token']})",
                flush=True,
            )
        for sessions, budget in plan["throughput"]:
            row = {"model": preset, **prefill_throughput(loaded, sessions, 1020, budget, rate)}
            out["throughput"].append(row)
            save()
            print(
                f"{preset}: prefill {sessions} x 1020 tokens, budget {budget}: "
                f"{row['tokens_per_s']:,.0f} tokens/s, {row['tflops']:.1f} TFLOP/s "
                f"({row['pct_of_matmul_rate']:.1f}% of the matmul rate), {row['steps']} steps",
                flush=True,
            )
        for rows in plan["graph"]:
            row = {"model": preset, **graph_vs_eager(loaded, rows, 1020)}
            out["graph_vs_eager"].append(row)
            save()
            print(
                f"{preset}: prefill forward {rows} x 1020: eager {row['eager_ms']:.3f} ms (host "
                f"enqueue {row['eager_host_enqueue_ms']:.3f}), graph {row['graph_ms']:.3f} ms: "
                f"saves {row['graph_saves_pct']:.1f}%",
                flush=True,
            )
        del loaded
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
