"""Tokens delivered to gRPC clients vs what the engine alone does, same workload, same run.

Arms (`--arms`, in the order given):
  engine      N endless conversations driven in-process through ThreadEngine (no network);
  standalone  the same conversations from `sinkserve loadtest` processes, through gateway
              processes to a replica process, without Ray (deployments.standalone);
  ray         the same through the Ray Serve application as users deploy it (`sinkserve serve`:
              gateways, the replica placed on the GPU by num_gpus, its engine in a child process).
`--store` (off, sqlite, or a URL) sets the served arms' session store; an arm may override it with
a suffix: `ray+store` (SQLite) or `ray-nostore`. Every arm uses the same turns, sampling and reply
lengths; each served arm's tokens/s over the engine's is the cost of its network path.

    python bench/serve_bench.py --sessions 2000 --arms standalone,ray,ray+store,engine \
        --json docs/serve_bench_h200.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from sinkserve.loadtest import WORDS


def engine_alone(args: argparse.Namespace) -> dict:
    import torch

    from sinkcache.config import EngineConfig
    from sinkcache.events import TokensEvent
    from sinkcache.host.builder import build_engine
    from sinkcache.inputs import ChatTurn, GenerationParams

    params = GenerationParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    )

    async def main() -> dict:
        config = EngineConfig(
            model=args.model,
            sink=4,
            window=args.window,
            slots=args.sessions,
            flush_interval_s=args.flush_interval,
            kv_dtype=args.kv_dtype,
        )
        engine = build_engine(config)
        engine.start()
        deadline = time.monotonic() + args.ramp + args.duration
        steady_from = time.monotonic() + args.ramp
        tokens = 0

        async def converse(i: int) -> None:
            nonlocal tokens
            rng = random.Random(i)
            await asyncio.sleep(args.ramp * i / args.sessions)
            session = (await engine.open_session()).session_id
            while time.monotonic() < deadline:
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
                async for event in await engine.append(session, ChatTurn("user", text), params):
                    if isinstance(event, TokensEvent) and time.monotonic() >= steady_from:
                        tokens += len(event.ids)
                await asyncio.sleep(rng.uniform(0, args.think_max))

        runners = [asyncio.create_task(converse(i)) for i in range(args.sessions)]
        await asyncio.sleep(args.ramp + args.duration)
        steady_tokens = tokens
        for task in runners:
            task.cancel()
        await engine.shutdown()
        return {
            "tokens_per_s": steady_tokens / args.duration,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }

    result = asyncio.run(main())
    gc.collect()  # the engine is gone with main(): give the served arms its GPU memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def served(args: argparse.Namespace, out: Path, arm: str, label: str) -> dict:
    """One served arm: start its processes, run the load, collect the clients' results (its
    files in `out` named by `label`: an arm may run more than once)."""
    kind, _, store_flag = arm.partition("+")
    if arm.endswith("-nostore"):
        kind, store = arm.removesuffix("-nostore"), "off"
    else:
        store = "sqlite" if store_flag == "store" else args.store
    port = 50070 if kind == "standalone" else 50051
    procs = _start_standalone(args, store) if kind == "standalone" else _start_ray(args, store)
    try:
        profiled = None  # the replica process py-spy samples (its engine child with it)
        if args.profile:
            profiled = procs[0].pid if kind == "standalone" else _ray_replica_pid(port)
        result = _load(args, out, label, port, profiled)
        result["replica"] = asyncio.run(_replica_stats(f"localhost:{port}"))
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
    result["store"] = store
    return result


def _start_ray(args: argparse.Namespace, store: str) -> list[subprocess.Popen]:
    command = [
        sys.executable, "-m", "sinkserve.cli", "serve", "--model", args.model,
        "--window", str(args.window), "--slots", str(args.sessions),
        "--flush-interval-s", str(args.flush_interval), "--gateways", str(args.gateways),
        "--max-gateways-per-node", str(args.gateways), "--host", "127.0.0.1", "--port", "50051",
        "--session-store", store, "--replicas", str(args.replicas),
        *(["--gpus-per-replica", str(_gpus_per_replica(args))] if args.replicas > 1 else []),
        *(["--kv-dtype", args.kv_dtype] if args.kv_dtype != "auto" else []),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    for line in process.stdout:
        if line.startswith("ready"):
            return [process]
    raise RuntimeError(f"sinkserve serve exited ({process.wait()})")


def _gpus_per_replica(args: argparse.Namespace) -> float:
    """As given; else one GPU each where there are enough, else the replicas share the one."""
    if args.gpus_per_replica is not None:
        return args.gpus_per_replica
    import torch

    return 1.0 if torch.cuda.device_count() >= args.replicas else 1 / args.replicas


def _start_standalone(args: argparse.Namespace, store: str) -> list[subprocess.Popen]:
    settings = [
        f"model={args.model}",
        f"window={args.window}",
        f"slots={args.sessions}",
        f"flush_interval_s={args.flush_interval}",
        f"engine_process={not args.engine_thread}",
        f"session_store={store}",
        f"kv_dtype={args.kv_dtype}",
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deployments.standalone",
                "replica",
                "--port",
                "50071",
                "--set",
                *settings,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
    ]
    assert "ready" in procs[0].stdout.readline()
    for _ in range(args.gateways):
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deployments.standalone",
                "gateway",
                "--port",
                "50070",
                "--reuse-port",
                "--replica",
                "localhost:50071",
                *(["--store", store] if store not in ("off", "sqlite") else []),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert "ready" in gateway.stdout.readline()
        procs.append(gateway)
    return procs


def _load(
    args: argparse.Namespace, out: Path, arm: str, port: int, replica_pid: int | None
) -> dict:
    time.sleep(2)
    per = args.sessions // args.clients
    logs = [(out / f"{arm}_client{c}.log").open("w") for c in range(args.clients)]
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sinkserve.cli",
                "loadtest",
                "--target",
                f"localhost:{port}",
                "--sessions",
                str(per),
                "--duration",
                str(args.duration),
                "--ramp",
                str(args.ramp),
                "--think-min",
                "0",
                "--think-max",
                str(args.think_max),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--temperature",
                str(args.temperature),
                "--top-p",
                str(args.top_p),
                "--seed",
                str(c),
                "--json",
                str(out / f"{arm}_client{c}.json"),
                *(
                    ["--chaos-kill-every", str(args.chaos_kill_every)]
                    if args.chaos_kill_every and c == 0
                    else []
                ),
            ],
            stdout=subprocess.DEVNULL,
            stderr=logs[c],
        )
        for c in range(args.clients)
    ]
    profiler = None
    if args.profile and replica_pid is not None:
        # Sample the replica (and its engine process) during the steady phase.
        time.sleep(args.ramp + 5)
        profiler = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(replica_pid),
                "--subprocesses",
                "--duration",
                "20",
                "--format",
                "raw",
                "--output",
                str(out / f"{arm}_replica_profile.txt"),
            ],
            stdout=subprocess.DEVNULL,
        )
    for c, client in enumerate(clients):
        client.wait()
        logs[c].close()
        if client.returncode != 0:
            log = (out / f"{arm}_client{c}.log").read_text()[-2000:]
            raise RuntimeError(f"{arm} load client {c} exited {client.returncode}:\n{log}")
    if profiler is not None:
        profiler.wait()
    results = [json.loads((out / f"{arm}_client{c}.json").read_text()) for c in range(args.clients)]
    return {
        "tokens_per_s": sum(r["tokens_per_s"] for r in results),
        "sessions_opened": sum(r["sessions_opened"] for r in results),
        "sessions_lost": sum(r["sessions_lost"] for r in results),
        "sessions_resumed": sum(r["sessions_resumed"] for r in results),
        "opens_refused": sum(r["opens_refused"] for r in results),
        "kills": [k for r in results for k in r["kills"]],
        "failover_ms": [r["failover_ms"] for r in results],
        "resume_ms": [r["resume_ms"] for r in results],
        "errors": [r["errors"] for r in results],
        "ttft_ms_p50": [r["ttft_ms"]["p50"] for r in results],
        "ttft_ms_p99": [r["ttft_ms"]["p99"] for r in results],
        "itl_ms_p50": [r["itl_ms"]["p50"] for r in results],
        "itl_ms_p99": [r["itl_ms"]["p99"] for r in results],
        "turns": sum(r["turns"] for r in results),
        "timeline": merged_timeline(results),
    }


def merged_timeline(results: list[dict]) -> list[dict]:
    """All clients' per-second points summed: delivered tokens/s and active sessions over time."""
    merged: dict[int, dict] = {}
    for result in results:
        for point in result["timeline"]:
            slot = merged.setdefault(
                round(point["t"]),
                {"t": round(point["t"]), "tokens_per_s": 0.0, "active_sessions": 0},
            )
            slot["tokens_per_s"] += point["tokens_per_s"]
            slot["active_sessions"] += point["active_sessions"]
    return [merged[t] for t in sorted(merged)]


def _ray_replica_pid(port: int) -> int:
    """The pid of the (first) SessionReplica actor, as its Stats report it."""
    return int(asyncio.run(_replica_stats(f"localhost:{port}"))[0]["pid"])


async def _replica_stats(address: str) -> list[dict]:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from sinkwire.v1 import streaming_llm_pb2 as pb
    from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=10)
    return [MessageToDict(r, preserving_proto_field_name=True) for r in reply.replicas]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:smollm2-135m")
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--ramp", type=float, default=10)
    parser.add_argument("--think-max", type=float, default=0.05)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--flush-interval", type=float, default=0.1)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=1, help="ray arm: session replicas")
    parser.add_argument(
        "--gpus-per-replica",
        type=float,
        help="ray arm: default 1 with a GPU per replica, else 1/replicas (they share one GPU)",
    )
    parser.add_argument("--kv-dtype", default="auto", help="auto or fp8_e4m3")
    parser.add_argument("--store", default="off", help="served arms' session store")
    parser.add_argument(
        "--arms",
        default="engine,standalone",
        help="comma list, in order; an arm may repeat (saved as arm#2, ...)",
    )
    parser.add_argument(
        "--chaos-kill-every", type=float, help="one client SIGKILLs a replica every S seconds"
    )
    parser.add_argument("--out", default=".")
    parser.add_argument("--json", default="serve_bench.json")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the replica process (and its engine child) for 20 s in the steady phase "
        "(ray arms: the first replica)",
    )
    parser.add_argument(
        "--engine-thread",
        action="store_true",
        help="standalone: run the replica's engine on a thread of the gRPC process",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": date.today().isoformat(), "config": vars(args), "arms": {}}

    def save() -> None:  # after every arm, so a cut run keeps what it measured
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    for arm in args.arms.split(","):
        # An arm named again (to alternate arms against drift) is saved as "arm#2", "arm#3", ...
        label, n = arm, 1
        while label in result["arms"]:
            n += 1
            label = f"{arm}#{n}"
        # Served arms run in their own processes and free the GPU when they stop.
        data = engine_alone(args) if arm == "engine" else served(args, out, arm, label)
        result["arms"][label] = data
        print(f"{label}: {data['tokens_per_s']:.0f} tokens/s", flush=True)
        save()
    engine = result["arms"].get("engine")
    if engine:
        for arm, data in result["arms"].items():
            if arm != "engine":
                data["over_engine"] = data["tokens_per_s"] / engine["tokens_per_s"]
                print(f"{arm} / engine alone = {data['over_engine']:.1%}", flush=True)
    save()


if __name__ == "__main__":
    main()
