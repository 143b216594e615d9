"""Plot a `bench/serve_bench.py` result: tokens/s delivered to gRPC clients over time against the
engine alone, and (given a second result run with --engine-thread) the two replica layouts.

    python bench/plot_serve.py docs/serve_bench_h100.json \
        --thread docs/serve_bench_h100_thread_engine.json --plot docs/serve_bench_h100.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result", type=Path)
    parser.add_argument("--thread", type=Path, help="the same benchmark with --engine-thread")
    parser.add_argument("--plot", type=Path, required=True)
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    served, alone = result["served"], result["engine_alone"]["tokens_per_s"]
    ramp = result["config"]["ramp"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), width_ratios=(2, 1))
    times = [p["t"] for p in served["timeline"]]
    left.plot(times, [p["tokens_per_s"] for p in served["timeline"]], label="delivered to clients")
    left.axhline(alone, color="gray", linestyle="--", label=f"engine alone ({alone:,.0f})")
    left.axvline(ramp, color="gray", linestyle=":", label="end of ramp")
    left.set_xlabel("seconds")
    left.set_ylabel("tokens/s")
    left.set_title(f"{result['config']['sessions']} sessions through gateway and replica")
    left.legend(loc="lower right")
    bars = {"engine\nalone": alone, "served,\nengine process": served["tokens_per_s"]}
    if args.thread:
        thread = json.loads(args.thread.read_text())["served"]["tokens_per_s"]
        bars["served,\nengine thread"] = thread
    right.bar(
        list(bars), list(bars.values()), color=["gray", "tab:blue", "tab:orange"][: len(bars)]
    )
    for i, value in enumerate(bars.values()):
        right.text(i, value, f"{value:,.0f}\n{value / alone:.0%}", ha="center", va="bottom")
    right.set_ylim(0, alone * 1.25)
    right.set_ylabel("tokens/s after the ramp")
    right.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{result['engine_alone']['device']}, {result['date']}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
