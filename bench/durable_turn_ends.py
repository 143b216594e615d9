"""What durable TurnEnds cost: the same load against one replica with `durable_turn_ends` on and
off, arms alternated, each on a fresh SQLite store.

Each of `--sessions` clients takes back-to-back turns (a few input tokens, `--reply` tokens) for
`--seconds`, straight to the replica's gRPC server (no gateway, no Ray). Per arm it prints the
turns and reply tokens per second of the whole replica, and the p50/p95 time from a turn's last
reply token to its TurnEnd (what the wait for the store adds to a turn).

    python bench/durable_turn_ends.py --sessions 16 --seconds 20 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from deployments.internal import gateway_metadata, internal_token
from deployments.session_service import start_replica_server
from deployments.settings import AppSettings
from deployments.store import SqliteSessionStore
from sinkcache.host.start import start_engine
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

SECRET = "bench-secret-" + "b" * 32


async def client(port: int, reply: int, until: float, waits: list[float]) -> tuple[int, int]:
    """Back-to-back turns until `until`; returns (turns, reply tokens)."""
    to_server: asyncio.Queue = asyncio.Queue()
    to_server.put_nowait(pb.ClientMessage(open=pb.Open()))
    generate = pb.GenerationParams(max_new_tokens=reply, ignore_eos=True)
    append = pb.ClientMessage(
        append=pb.Append(tokens=pb.TokenIds(ids=[5, 6, 7]), generate=generate)
    )

    async def requests():
        while (message := await to_server.get()) is not None:
            yield message

    turns = tokens = 0
    last_token_at = 0.0
    metadata = gateway_metadata(internal_token(SECRET), "")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.StreamingLLMStub(channel).Session(requests(), metadata=metadata)
        async for message in call:
            kind = message.WhichOneof("kind")
            if kind == "tokens":
                tokens += len(message.tokens.ids)
                last_token_at = time.perf_counter()
            elif kind == "turn_end":
                waits.append(time.perf_counter() - last_token_at)
                turns += 1
                if time.perf_counter() >= until:
                    to_server.put_nowait(None)
                    break
                to_server.put_nowait(append)
            if kind == "opened":
                to_server.put_nowait(append)
        call.cancel()
    return turns, tokens


async def arm(durable: bool, sessions: int, seconds: float, reply: int) -> dict:
    settings = AppSettings.from_args(
        {
            "model": "tiny",
            "slots": sessions,
            "window": 60,
            "torch_threads": 1,
            "resume_secret": SECRET,
            "durable_turn_ends": str(durable),
        }
    )
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteSessionStore(Path(directory) / "sessions.db", ttl_s=3600.0)
        engine = await start_engine(settings.engine, in_process=False)
        server, replica, _, port = await start_replica_server(engine, "r0", settings, store=store)
        try:
            waits: list[float] = []
            until = time.perf_counter() + seconds
            started = time.perf_counter()
            done = await asyncio.gather(
                *(client(port, reply, until, waits) for _ in range(sessions))
            )
            elapsed = time.perf_counter() - started
        finally:
            await server.stop(grace=None)
            await replica.writer.stop(timeout_s=5)
            await engine.shutdown()
            await store.close()
    waits.sort()
    return {
        "durable_turn_ends": durable,
        "turns_per_s": round(sum(t for t, _ in done) / elapsed, 1),
        "reply_tokens_per_s": round(sum(n for _, n in done) / elapsed, 1),
        "turn_end_wait_ms_p50": round(1000 * statistics.median(waits), 2),
        "turn_end_wait_ms_p95": round(1000 * waits[int(0.95 * (len(waits) - 1))], 2),
        "checkpoints_written": replica.writer.written,
        "flushes": replica.writer.flushes,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--reply", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for durable in (True, False):
            result = await arm(durable, args.sessions, args.seconds, args.reply)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
