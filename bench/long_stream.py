"""One session streamed to a million tokens: per-token latency and GPU memory stay flat.

The stream grows by appending text in window-sized prefill chunks (as a log or document stream
would); at checkpoints the session generates a reply one token per step, and each decode step is
timed. GPU memory allocated is read at every checkpoint after warm-up.

    python bench/long_stream.py --tokens 1000000 --json docs/long_stream.json --plot docs/latency_vs_position.png
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import date
from pathlib import Path

import torch

from sinkcache.config import EngineConfig
from sinkcache.host.builder import build_core
from sinkcache.inputs import GenerationParams, TokenInput


class _Sink:
    def __init__(self) -> None:
        self.done = False

    def push(self, event) -> None:
        from sinkcache.events import TurnEndEvent

        if isinstance(event, TurnEndEvent):
            self.done = True

    def fail(self, error) -> None:
        raise error


def run(core, session_id: str, item, params) -> list[float]:
    """Submit one request and step until it ends; returns the wall time of each step (s)."""
    sink = _Sink()
    core.submit(session_id, item, params, False, sink)
    times = []
    while not sink.done:
        start = time.perf_counter()
        core.step()
        if core.runner.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--reply", type=int, default=300, help="decode steps timed per checkpoint")
    parser.add_argument("--json", default="long_stream.json")
    parser.add_argument("--plot")
    args = parser.parse_args()

    config = EngineConfig(model=args.model, sink=args.sink, window=args.window, slots=1)
    core = build_core(config)
    core.open_session("long")
    rng = random.Random(0)
    vocab = core.intake.vocab_size
    params = GenerationParams(max_new_tokens=args.reply, temperature=0.0, ignore_eos=True)
    checkpoints = sorted(
        {c for c in (1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000) if c <= args.tokens}
        | {args.tokens}
    )
    rows = []
    warm_allocated = None
    for checkpoint in checkpoints:
        stream_pos = core.sessions["long"].stream_pos
        grow = checkpoint - stream_pos - args.reply
        if grow > 0:
            chunk = 1 << 16  # append in pieces so the host list stays small
            while grow > 0:
                n = min(chunk, grow)
                run(core, "long", TokenInput(tuple(rng.randrange(vocab) for _ in range(n))), None)
                grow -= n
        step_times = run(core, "long", TokenInput((rng.randrange(vocab),)), params)
        decode = sorted(step_times[3:])  # skip the prefill step and graph warm-up
        median_ms = 1000 * decode[len(decode) // 2]
        allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        if warm_allocated is None:
            warm_allocated = allocated
        row = {
            "stream_position": core.sessions["long"].stream_pos,
            "ms_per_token_p50": median_ms,
            "ms_per_token_p90": 1000 * decode[int(len(decode) * 0.9)],
            "gpu_allocated_bytes": allocated,
            "gpu_allocated_growth_bytes": allocated - warm_allocated,
        }
        rows.append(row)
        print(
            f"stream {row['stream_position']:>9d}: {median_ms:.3f} ms/token (p90 {row['ms_per_token_p90']:.3f}),"
            f" allocated {allocated / 2**20:.1f} MiB (+{row['gpu_allocated_growth_bytes']})",
            flush=True,
        )
    first, last = rows[0]["ms_per_token_p50"], rows[-1]["ms_per_token_p50"]
    out = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": args.model,
        "sink": args.sink,
        "window": args.window,
        "rows": rows,
        "latency_change_pct": 100 * (last - first) / first,
    }
    print(
        f"latency at the end vs at {rows[0]['stream_position']}: {out['latency_change_pct']:+.2f}%"
    )
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        xs = [r["stream_position"] for r in rows]
        ax.plot(xs, [r["ms_per_token_p50"] for r in rows], marker="o", label="ms/token (median)")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("stream position (tokens)")
        ax.set_ylabel("decode latency per token (ms)")
        ax2 = ax.twinx()
        ax2.plot(
            xs,
            [r["gpu_allocated_bytes"] / 2**20 for r in rows],
            color="grey",
            linestyle="--",
            marker=".",
            label="GPU MiB allocated",
        )
        ax2.set_ylabel("GPU memory allocated (MiB)")
        ax2.set_ylim(bottom=0)
        ax.set_title(f"one session, {args.model}, cache {args.sink}+{args.window}, {out['device']}")
        fig.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
