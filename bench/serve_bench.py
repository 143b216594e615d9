"""Tokens delivered to gRPC clients vs what the engine alone does, same workload, no Ray.

1. engine alone: N endless conversations driven in-process through ThreadEngine (no network);
2. served: the same conversations from `sinkserve loadtest` processes, through gateway processes
   (deployments.standalone gateway) to a replica process (deployments.standalone replica).
Both use the same turns, sampling and reply lengths; the ratio of their tokens/s is the cost of the
network path (client -> gateway -> replica -> engine and back).

    python bench/serve_bench.py --sessions 2000 --json docs/serve_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
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

    return asyncio.run(main())


def served(args: argparse.Namespace, out: Path) -> dict:
    settings = [
        f"model={args.model}",
        f"window={args.window}",
        f"slots={args.sessions}",
        f"flush_interval_s={args.flush_interval}",
        f"engine_process={not args.engine_thread}",
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
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert "ready" in gateway.stdout.readline()
        procs.append(gateway)
    time.sleep(2)
    per = args.sessions // args.clients
    clients = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sinkserve.cli",
                "loadtest",
                "--target",
                "localhost:50070",
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
                str(out / f"client{c}.json"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for c in range(args.clients)
    ]
    profiler = None
    if args.profile:
        # Sample the replica (and its engine process) during the steady phase.
        time.sleep(args.ramp + 5)
        profiler = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(procs[0].pid),
                "--subprocesses",
                "--duration",
                "20",
                "--format",
                "raw",
                "--output",
                str(out / "replica_profile.txt"),
            ],
            stdout=subprocess.DEVNULL,
        )
    for client in clients:
        client.wait()
    replica_stats = asyncio.run(_replica_stats("localhost:50071"))
    if profiler is not None:
        profiler.wait()
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)
    results = [json.loads((out / f"client{c}.json").read_text()) for c in range(args.clients)]
    return {
        "tokens_per_s": sum(r["tokens_per_s"] for r in results),
        "sessions_opened": sum(r["sessions_opened"] for r in results),
        "sessions_lost": sum(r["sessions_lost"] for r in results),
        "errors": [r["errors"] for r in results],
        "ttft_ms_p50": [r["ttft_ms"]["p50"] for r in results],
        "ttft_ms_p99": [r["ttft_ms"]["p99"] for r in results],
        "itl_ms_p50": [r["itl_ms"]["p50"] for r in results],
        "itl_ms_p99": [r["itl_ms"]["p99"] for r in results],
        "turns": sum(r["turns"] for r in results),
        "replica": replica_stats,
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


async def _replica_stats(address: str) -> dict:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from sinkwire.v1 import streaming_llm_pb2 as pb
    from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=10)
    return MessageToDict(reply.replicas[0], preserving_proto_field_name=True)


def main() -> None:
    parser = argparse.ArgumentParser()
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
    parser.add_argument("--out", default=".")
    parser.add_argument("--json", default="serve_bench.json")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--profile", action="store_true", help="py-spy the replica for 20 s")
    parser.add_argument(
        "--engine-thread",
        action="store_true",
        help="served: run the replica's engine on a thread of the gRPC process (not a child)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    result = {"date": date.today().isoformat(), "config": vars(args)}
    # Served first: its replica process needs the GPU memory this process would keep cached.
    result["served"] = served(args, out)
    print(f"served through gateway: {result['served']['tokens_per_s']:.0f} tokens/s", flush=True)
    if not args.skip_engine:
        result["engine_alone"] = engine_alone(args)
        print(f"engine alone: {result['engine_alone']['tokens_per_s']:.0f} tokens/s", flush=True)
    if "engine_alone" in result:
        ratio = result["served"]["tokens_per_s"] / result["engine_alone"]["tokens_per_s"]
        result["served_over_engine"] = ratio
        print(f"delivered / engine alone = {ratio:.1%}", flush=True)
    print(json.dumps(result["served"], indent=1))
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
