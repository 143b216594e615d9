"""Plot a `bench/serve_bench.py` result: tokens/s delivered to gRPC clients over time by each
served arm, and every arm's steady tokens/s against the engine alone.

    python bench/plot_serve.py docs/serve_bench_h200.json --plot docs/serve_bench_h200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = {
    "engine": "engine\nalone",
    "ray": "Ray Serve",
    "ray+store": "Ray Serve\n+ SQLite store",
    "standalone": "standalone\nlauncher",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path)
    parser.add_argument("--plot", type=Path, required=True)
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    arms, config = result["arms"], result["config"]
    engine = arms.get("engine", {}).get("tokens_per_s")
    colors = {name: f"C{i}" for i, name in enumerate(arms)}  # the same colour on both sides
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), width_ratios=(2, 1))
    for name, arm in arms.items():
        if "timeline" in arm:
            points = arm["timeline"]
            left.plot(
                [p["t"] for p in points],
                [p["tokens_per_s"] for p in points],
                label=LABELS.get(name, name).replace("\n", " "),
                color=colors[name],
                linewidth=1,
            )
    if engine:
        left.axhline(engine, color="gray", linestyle="--", label=f"engine alone ({engine:,.0f})")
    left.axvline(config["ramp"], color="gray", linestyle=":", label="end of ramp")
    left.set_xlabel("seconds (1 s bins, all clients summed)")
    left.set_ylabel("tokens/s delivered to clients")
    left.set_title(f"{config['sessions']} sessions, {config['model']}, window {config['window']}")
    left.legend(loc="lower right", fontsize=8)
    names = list(arms)
    values = [arms[n]["tokens_per_s"] for n in names]
    right.bar([LABELS.get(n, n) for n in names], values, color=[colors[n] for n in names])
    for i, value in enumerate(values):
        share = f"\n{value / engine:.1%}" if engine else ""
        right.text(i, value, f"{value:,.0f}{share}", ha="center", va="bottom", fontsize=8)
    right.set_ylim(0, max(values) * 1.3)
    right.set_ylabel("tokens/s after the ramp")
    right.tick_params(axis="x", labelsize=7)
    device = arms.get("engine", {}).get("device", "")
    fig.suptitle(f"serve_bench, {device}, {result['date']}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
