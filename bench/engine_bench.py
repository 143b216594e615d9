"""Decode throughput against the memory roofline, and the baselines, measured in one run.

For each model shape, cache size and session count B: every session's slot is full (its ring has
wrapped, so each step reads the whole cache), all B sessions generate, and the engine's own loop
(scheduler, CUDA-graph step, output processing) is timed. The roofline is
    tokens/s <= B * BW / (weight bytes + B * cache bytes per session)
with BW the device's copy bandwidth (bytes read + written) measured in the same run.
Baselines, same shape and dtype: HF transformers eager with a DynamicCache kept at sink + window
by evicting one token per step (batch 1 and batched), and the paper's sliding window with
re-computation (every token recomputed from the last sink + window tokens).

`graph ms` replays the captured graph of the bucket the step uses (the one for B sessions).
`--kv-dtype fp8_e4m3` measures the fp8 arena; its roofline counts its own bytes (codes + scales).

    python bench/engine_bench.py --json docs/bench_engine.json --plot docs/throughput_vs_sessions.png
    python bench/engine_bench.py --rows "smollm2-135m:1020:1,256;llama3-8b:1020:128" \
        --kv-dtype auto,fp8_e4m3 --no-baselines --json rows.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from sinkcache.config import PRESETS, CacheGeometry, EngineConfig
from sinkcache.core.arena import FP8, KV_DTYPES, kv_bytes_per_slot
from sinkcache.core.runner import DECODE_BUCKETS
from sinkcache.core.sampling import SamplerVariant
from sinkcache.families import shape_to_hf_config
from sinkcache.host.builder import build_core
from sinkcache.inputs import GenerationParams, TokenInput
from sinkcache.models.loader import LoadedModel, random_model


def copy_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    return 2 * n * 2 / sorted(times[5:])[len(times[5:]) // 2]


def random_loaded(preset: str, dtype: torch.dtype = torch.bfloat16) -> LoadedModel:
    """Random weights in a preset's shape on the GPU, without a tokenizer (token ids only: the
    GPU machine cannot fetch the default tokenizer)."""
    shape = PRESETS[preset]
    return LoadedModel(f"random:{preset}", shape, random_model(shape, dtype, "cuda"), None)


class _Null:
    def push(self, event) -> None:
        pass

    def fail(self, error) -> None:
        raise error


def fill_random(arena) -> None:
    """Random cache contents (never time on zeros); fp8 arenas get codes of N(0, 1) and scales."""
    with torch.no_grad():
        for layer in range(arena.k.shape[0]):
            for t in (arena.k[layer], arena.v[layer]):
                if t.dtype == FP8:
                    t.copy_(torch.randn(t.shape, dtype=torch.bfloat16, device=t.device))
                else:
                    t.normal_(0.0, 1.0)
        if arena.quantized:
            arena.k_scale.uniform_(0.01, 0.03)
            arena.v_scale.uniform_(0.01, 0.03)


def decoding_core(
    loaded, sink: int, window: int, sessions: int, kv_dtype: str = "auto", spare: int = 0
):
    """An engine whose `sessions` slots are full and wrapped, every session generating greedily;
    prefilled and past its graph capture. `spare` more slots stay free."""
    config = EngineConfig(
        model=loaded.name,
        sink=sink,
        window=window,
        slots=sessions + spare,
        cuda_graphs=True,
        kv_dtype=kv_dtype,
    )
    core = build_core(config, loaded, warm_up=False)  # only this batch size's graph is needed
    arena = core.arena
    fill_random(arena)
    params = GenerationParams(max_new_tokens=10**9, temperature=0.0, ignore_eos=True)
    for i in range(sessions):
        session = core.open_session(f"s{i}")
        stream_pos = 10**6 + 7 * i  # deep into the stream: the ring has wrapped many times
        arena.seen[session.slot] = stream_pos
        session.cached = stream_pos
        core.submit(session.session_id, TokenInput((i % 1000,)), params, False, _Null())
    for _ in range(8):  # prefill row for everyone, then graph capture and warm-up
        core.step()
    torch.cuda.synchronize()
    assert len(core.scheduler.decoding) == sessions
    return core


def step_graph(core, sessions: int):
    """The captured decode graph a step of `sessions` greedy rows replays."""
    bucket = next(b for b in DECODE_BUCKETS if b >= sessions)
    return core.runner._graphs[bucket, SamplerVariant.GREEDY]


def time_graph(graph, replays: int = 20) -> float:
    """ms per replay, median of 5 runs of `replays` back-to-back replays."""
    runs = []
    for _ in range(5):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        runs.append(begin.elapsed_time(end) / replays)
    return sorted(runs)[len(runs) // 2]


def engine_decode(
    loaded, sink: int, window: int, sessions: int, steps: int, kv_dtype: str = "auto"
) -> dict[str, float]:
    """Tokens/s of the engine loop with `sessions` full, wrapped slots all generating."""
    core = decoding_core(loaded, sink, window, sessions, kv_dtype)
    arena = core.arena
    capacity = sink + window
    start = time.perf_counter()
    for _ in range(steps):
        core.step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    # GPU time of the captured step alone (the CUDA graph), to separate host overhead.
    graph_ms = time_graph(step_graph(core, sessions))
    filled = int(arena.seen[core.sessions["s0"].slot])
    assert filled > capacity
    del core, arena
    gc.collect()
    torch.cuda.empty_cache()
    return {"step_ms": seconds * 1000, "graph_ms": graph_ms, "tokens_per_s": sessions / seconds}


def hf_baseline(shape, sink: int, window: int, batch: int, steps: int) -> dict[str, float]:
    """HF eager decode with a DynamicCache held at sink + window (evict one token per step)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: an 8B model on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(shape_to_hf_config(shape), dtype=torch.bfloat16)
    model = model.eval()
    cfg = model.config
    kv, dim, length = cfg.num_key_value_heads, cfg.head_dim, sink + window - 1
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(batch, kv, length, dim, dtype=torch.bfloat16, device="cuda")
        cache.update(k, torch.randn_like(k), layer)
    ids = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")
    position = torch.full((batch, 1), length, device="cuda")

    def step() -> None:
        nonlocal ids
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, position_ids=position, use_cache=True)
        ids = out.logits[:, -1:].argmax(-1)
        for layer in cache.layers:  # evict the oldest recent token: keep sinks + window
            layer.keys = torch.cat([layer.keys[:, :, :sink], layer.keys[:, :, sink + 1 :]], dim=2)
            layer.values = torch.cat(
                [layer.values[:, :, :sink], layer.values[:, :, sink + 1 :]], dim=2
            )

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    model = cache = None
    gc.collect()
    torch.cuda.empty_cache()
    return {"step_ms": seconds * 1000, "tokens_per_s": batch / seconds}


def recompute_baseline(shape, span: int, steps: int = 10) -> float:
    """ms per token for sliding window with re-computation: a fresh forward over `span` tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(shape_to_hf_config(shape), dtype=torch.bfloat16)
    model = model.eval()
    ids = torch.randint(0, shape.vocab_size, (1, span), device="cuda")
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    del model
    torch.cuda.empty_cache()
    return (time.perf_counter() - start) / steps * 1000


def parse_rows(spec: str) -> dict[str, dict[int, list[int]]]:
    """ "smollm2-135m:1020:1,256;llama3-8b:1020:128" -> {preset: {window: [sessions]}}."""
    plans: dict[str, dict[int, list[int]]] = {}
    for part in spec.split(";"):
        preset, window, batches = part.split(":")
        plans.setdefault(preset, {})[int(window)] = [int(b) for b in batches.split(",")]
    return plans


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default="bench_engine.json")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="a few configurations only")
    parser.add_argument("--rows", help='e.g. "smollm2-135m:1020:1,256;llama3-8b:1020:128"')
    parser.add_argument("--kv-dtype", default="auto", help="auto, fp8_e4m3, or both: auto,fp8_e4m3")
    parser.add_argument("--no-baselines", action="store_true", help="skip HF and recompute")
    args = parser.parse_args()

    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"device {device}; copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    plans = {
        "smollm2-135m": {1020: [1, 16, 64, 256, 1024, 2048], 2044: [1, 16, 64, 256, 1024, 2048]},
        "llama3-8b": {1020: [1, 16, 64, 128, 256], 2044: [1, 16, 64, 128]},
    }
    if args.quick:
        plans = {"smollm2-135m": {1020: [1, 256]}, "llama3-8b": {1020: [128]}}
    if args.rows:
        plans = parse_rows(args.rows)
    kv_dtypes = args.kv_dtype.split(",")
    rows: list[dict] = []
    baselines: list[dict] = []
    out = {
        "date": date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "engine": rows,
        "hf_baseline": baselines,
    }

    def save() -> None:  # after every row, so a crash keeps what was measured
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")

    for preset, caches in plans.items():
        shape = PRESETS[preset]
        loaded = random_loaded(preset)
        weight_bytes = shape.weight_bytes(2)
        for window, batches in caches.items():
            sink = 4
            for kv_dtype in kv_dtypes:
                geometry_bytes = kv_bytes_per_slot(
                    shape, CacheGeometry(sink, window), KV_DTYPES.get(kv_dtype, torch.bfloat16)
                )
                for batch in batches:
                    free = torch.cuda.mem_get_info()[0]
                    if batch * geometry_bytes > 0.85 * free:
                        print(f"{preset} cache {sink}+{window} B={batch} {kv_dtype}: does not fit")
                        continue
                    try:
                        result = engine_decode(loaded, sink, window, batch, args.steps, kv_dtype)
                    except Exception as error:  # keep the other rows
                        print(f"{preset} B={batch} {kv_dtype}: FAILED {error!r}")
                        gc.collect()
                        torch.cuda.empty_cache()
                        continue
                    roof = batch * bandwidth / (weight_bytes + batch * geometry_bytes)
                    row = {
                        "model": preset,
                        "sink": sink,
                        "window": window,
                        "sessions": batch,
                        "kv_dtype": kv_dtype,
                        **result,
                        "roofline_tokens_per_s": roof,
                        "pct_roofline": 100 * result["tokens_per_s"] / roof,
                    }
                    rows.append(row)
                    save()
                    print(
                        f"{preset:13s} cache {sink}+{window:<5d} B={batch:<5d} "
                        f"kv={kv_dtype:8s} step {row['step_ms']:8.3f} ms"
                        f" (graph {row['graph_ms']:7.3f})  {row['tokens_per_s']:10.0f} tok/s"
                        f"  roofline {roof:10.0f}  {row['pct_roofline']:5.1f}%",
                        flush=True,
                    )
        del loaded
        gc.collect()
        torch.cuda.empty_cache()

    if args.no_baselines:
        return
    for preset, batches in {"smollm2-135m": [1, 64, 256], "llama3-8b": [1, 128]}.items():
        if args.quick:
            batches = batches[-1:]
        for batch in batches:
            hf = hf_baseline(PRESETS[preset], 4, 1020, batch, 10)
            baselines.append({"model": preset, "sessions": batch, "sink": 4, "window": 1020, **hf})
            save()
            print(
                f"HF eager {preset:13s} B={batch:<4d} step {hf['step_ms']:8.2f} ms  {hf['tokens_per_s']:9.0f} tok/s",
                flush=True,
            )
    recompute_ms = recompute_baseline(PRESETS["smollm2-135m"], 1024)
    print(
        f"sliding window with re-computation, SmolLM2 shape, 1024 tokens: {recompute_ms:.2f} ms/token"
    )

    out["recompute_ms_per_token_smollm2_1024"] = recompute_ms
    save()
    if args.plot:
        plot(out, Path(args.plot))


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    engine = [r for r in data["engine"] if r.get("kv_dtype", "auto") == "auto"]
    for ax, preset in zip(axes, ("smollm2-135m", "llama3-8b"), strict=True):
        for window in sorted({r["window"] for r in engine if r["model"] == preset}):
            rows = [r for r in engine if r["model"] == preset and r["window"] == window]
            xs = [r["sessions"] for r in rows]
            ax.plot(
                xs,
                [r["tokens_per_s"] for r in rows],
                marker="o",
                label=f"sinkserve, cache 4+{window}",
            )
            ax.plot(
                xs,
                [r["roofline_tokens_per_s"] for r in rows],
                linestyle="--",
                label=f"roofline, cache 4+{window}",
            )
        hf = [r for r in data["hf_baseline"] if r["model"] == preset]
        if hf:
            ax.plot(
                [r["sessions"] for r in hf],
                [r["tokens_per_s"] for r in hf],
                marker="x",
                label="HF eager, cache 4+1020",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{preset} shape, bf16, {data['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
