"""Merge per-mode `sinkserve eval-ppl --json` files into one table and one plot.

python bench/plot_ppl.py docs/ppl_*.json --plot docs/ppl_vs_tokens.png --json docs/ppl.json
python bench/plot_ppl.py ppl_1m_*.json --log-x --plot ppl_vs_tokens_1m.png  # a million tokens
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sinkcache.tools.eval_ppl import MODES, EvalResult, cache_description, plot


def load(paths: list[Path]) -> list[EvalResult]:
    results = []
    for path in paths:
        data = json.loads(path.read_text())
        for item in data if isinstance(data, list) else [data]:
            results.append(EvalResult(**item))
    return sorted(results, key=lambda r: MODES.index(r.mode))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--train-window", type=int, default=8192)
    parser.add_argument(
        "--log-x", action="store_true", help="log token axis over log-spaced spans (long streams)"
    )
    args = parser.parse_args()
    results = load(args.inputs)
    after = sorted({k for r in results for k in r.ppl_after})
    header = ["mode", "cache", "tokens", "chunk", "ppl", *[f"ppl after {k}" for k in after]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        cells = [r.mode, cache_description(r.mode, r.sink, r.window), str(r.tokens), str(r.chunk)]
        cells += [f"{r.ppl:.3f}", *[f"{r.ppl_after.get(k, float('nan')):.3f}" for k in after]]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps([r.summary() for r in results], indent=2) + "\n")
    if args.plot:
        plot(results, args.plot, args.train_window, args.log_x)


if __name__ == "__main__":
    main()
