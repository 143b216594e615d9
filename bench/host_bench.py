"""Host cost per generated token, per process, with the model step replaced by a stand-in.

Measures the HOST, not the model: the engine child runs the real EngineCore (scheduler, intake
with chat-template encoding, sampler set-up, outputs, incremental detokenizer, event flushes over
the real process boundary of ProcessEngine), but its model step is sinkcache.host.stand_in's, which
answers each step at once with the tokens it would have sampled. Every session chats: a user turn,
a reply of --reply-tokens tokens, the next turn at once.

Two modes:
  process  this process drives ProcessEngine's asyncio API (as a replica does);
  grpc     a replica process (ProcessEngine + the real SessionServicer over gRPC) is driven by
           this process over one bidirectional gRPC stream per session, with the gateway's
           internal credential.

For each process it reports CPU time (user + system, psutil) over a measuring window divided by the
tokens generated in that window (engine Stats), in microseconds. CPU time, not wall time, so a
loaded box slows the run but not the figure much. --profile adds a py-spy record (raw format) of
the engine child over a second window, summarised by the innermost project frame of each sample.

  python bench/host_bench.py --sessions 1000 10000 --modes process grpc --profile \
      --out docs/host_bench_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sinkcache.config import EngineConfig  # noqa: E402
from sinkcache.events import TurnEndEvent  # noqa: E402
from sinkcache.inputs import ChatTurn, GenerationParams  # noqa: E402

BUILDER = "sinkcache.host.stand_in:build_stand_in_core"
PROJECT_DIRS = ("sinkcache/", "deployments/", "sinkserve/", "sinkwire/")
NOTE = "host only: the model step is a device-free stand-in (sinkcache/host/stand_in.py)"


def engine_config(sessions: int, prefill_budget: int) -> EngineConfig:
    return EngineConfig(
        model="default", slots=sessions, device="cpu", prefill_budget=prefill_budget
    )


def generation(session: int, turn: int, reply_tokens: int) -> GenerationParams:
    """Half the sessions greedy, half seeded sampling (the sampler front end sees both). Reply
    lengths spread over [reply_tokens / 2, 3 reply_tokens / 2) so turns do not end in waves."""
    length = reply_tokens // 2 + (session * 37 + turn * 11) % reply_tokens
    if session % 2:
        return GenerationParams(max_new_tokens=length, temperature=0.7, seed=session)
    return GenerationParams(max_new_tokens=length, temperature=0.0)


def user_text(session: int, turn: int) -> str:
    return f"Session {session}, turn {turn}: tell me something about the number {turn * 7 + 3}."


class Window:
    """CPU seconds of some processes between two readings."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self.start = {name: self._cpu(p) for name, p in processes.items()}

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    def seconds(self) -> dict[str, float]:
        return {name: self._cpu(p) - self.start[name] for name, p in self.processes.items()}


def summarise_profile(path: Path) -> dict:
    """Share of samples by the innermost project frame (py-spy raw: 'frame;frame;... count')."""
    by_frame: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        label = "(outside project code)"
        for frame in reversed(stack.split(";")):
            if any(d in frame for d in PROJECT_DIRS):
                label = frame.partition(" (")[0]
                break
        by_frame[label] += n
    top = [
        {"frame": frame, "share": round(n / total, 4), "samples": n}
        for frame, n in by_frame.most_common(25)
    ]
    return {"samples": total, "top": top}


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["py-spy", "record", "--format", "raw", "--nonblocking", "-r", "50",
         "-d", str(max(1, round(seconds))), "-p", str(pid), "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


# -- the drivers ---------------------------------------------------------------------------------
class ProcessDriver:
    """Sessions over ProcessEngine's asyncio API, in this process."""

    def __init__(self, args: argparse.Namespace, sessions: int) -> None:
        self.args, self.sessions = args, sessions
        self.turns = 0
        self.stop = False

    async def start(self) -> None:
        from sinkcache.host.process import ProcessEngine

        config = engine_config(self.sessions, self.args.prefill_budget)
        self.engine = await ProcessEngine.launch(config, builder=BUILDER)
        self.pids = {"engine": self.engine.pid, "client": os.getpid()}
        ids = [f"s{i}" for i in range(self.sessions)]
        await asyncio.gather(*(self.engine.open_session(sid) for sid in ids))
        self.tasks = [asyncio.create_task(self._chat(i, sid)) for i, sid in enumerate(ids)]

    async def _chat(self, index: int, session_id: str) -> None:
        turn = 0
        while not self.stop:
            item = ChatTurn("user", user_text(index, turn))
            params = generation(index, turn, self.args.reply_tokens)
            stream = await self.engine.append(session_id, item, params)
            async for event in stream:
                if isinstance(event, TurnEndEvent):
                    self.turns += 1
            turn += 1

    async def generated(self) -> int:
        return (await self.engine.stats()).generated_tokens

    async def close(self) -> None:
        self.stop = True
        await self.engine.shutdown()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class GrpcDriver:
    """Sessions over gRPC streams to a replica process (this script with --replica-child)."""

    def __init__(self, args: argparse.Namespace, sessions: int) -> None:
        self.args, self.sessions = args, sessions
        self.turns = 0
        self.stop = False

    async def start(self) -> None:
        import grpc

        from deployments.internal import gateway_metadata, internal_token
        from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

        self._dir = tempfile.TemporaryDirectory()
        ready = Path(self._dir.name) / "ready.json"
        command = [sys.executable, __file__, "--replica-child", str(ready),
                   "--sessions", str(self.sessions),
                   "--prefill-budget", str(self.args.prefill_budget)]  # fmt: skip
        self.replica = subprocess.Popen(command)
        deadline = time.monotonic() + 600
        while not ready.exists():
            if self.replica.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the replica process did not come up")
            await asyncio.sleep(0.2)
        info = json.loads(ready.read_text())
        self.pids = {"engine": info["engine_pid"], "replica": self.replica.pid,
                     "client": os.getpid()}  # fmt: skip
        self.metadata = gateway_metadata(internal_token(info["secret"]), "bench")
        options = [("grpc.max_concurrent_streams", 1 << 20)]
        self.channels = [
            grpc.aio.insecure_channel(info["address"], options=options) for _ in range(8)
        ]
        self.stubs = [pb_grpc.StreamingLLMStub(c) for c in self.channels]
        self.port_stats = info["address"]
        opened = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._chat(i, opened)) for i in range(self.sessions)]
        for _ in range(self.sessions):
            await opened.get()

    async def _chat(self, index: int, opened: asyncio.Queue) -> None:
        import grpc

        from sinkwire.v1 import streaming_llm_pb2 as pb

        call = self.stubs[index % len(self.stubs)].Session(metadata=self.metadata)
        await call.write(pb.ClientMessage(open=pb.Open()))
        message = await call.read()
        if not message.HasField("opened"):
            raise RuntimeError(f"session {index} did not open: {message}")
        opened.put_nowait(index)
        turn = 0
        while not self.stop:
            params = generation(index, turn, self.args.reply_tokens)
            generate = pb.GenerationParams(max_new_tokens=params.max_new_tokens,
                                           temperature=params.temperature)  # fmt: skip
            if params.seed is not None:
                generate.seed = params.seed
            append = pb.Append(generate=generate)
            append.chat.role, append.chat.content = "user", user_text(index, turn)
            await call.write(pb.ClientMessage(append=append))
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    details = await call.details()
                    raise RuntimeError(f"session {index}: stream ended ({details})")
                if message.HasField("turn_end"):
                    self.turns += 1
                    break
            turn += 1

    async def generated(self) -> int:
        return await asyncio.to_thread(self._ask_stats)

    def _ask_stats(self) -> int:
        """The replica child writes its engine's Stats to stats.json when asked (SIGUSR1)."""
        import signal

        path = Path(self._dir.name, "stats.json")
        path.unlink(missing_ok=True)
        os.kill(self.replica.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not answer a Stats request in 60 s")
            time.sleep(0.05)
        return json.loads(path.read_text())["generated_tokens"]

    async def close(self) -> None:
        self.stop = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()
        self.replica.terminate()
        self.replica.wait(60)
        self._dir.cleanup()


async def replica_child(ready: Path, sessions: int, prefill_budget: int) -> None:
    """The replica process of the gRPC mode: an engine child and the real session service."""
    import signal

    from deployments.session_service import start_replica_server
    from deployments.settings import AppSettings
    from sinkcache.host.process import ProcessEngine

    settings = AppSettings.from_args({"session_store": "off", "slots": sessions})
    settings.validate()
    config = engine_config(sessions, prefill_budget)
    engine = await ProcessEngine.launch(config, builder=BUILDER)
    server, _, _, port = await start_replica_server(engine, "r0", settings, 0, host="127.0.0.1")
    loop = asyncio.get_running_loop()

    async def write_stats() -> None:
        stats = await engine.stats()
        target = ready.with_name("stats.json")
        target.with_suffix(".tmp").write_text(
            json.dumps({"generated_tokens": stats.generated_tokens})
        )
        target.with_suffix(".tmp").rename(target)

    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(write_stats()))
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    info = {"address": f"127.0.0.1:{port}", "engine_pid": engine.pid,
            "secret": settings.resume_secret}  # fmt: skip
    ready.with_suffix(".tmp").write_text(json.dumps(info))
    ready.with_suffix(".tmp").rename(ready)
    await stopped.wait()
    await server.stop(grace=1)
    await engine.shutdown()


def check(driver: ProcessDriver | GrpcDriver) -> None:
    """Raise the first session's failure (a stalled benchmark says why)."""
    for task in driver.tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()


# -- one run -------------------------------------------------------------------------------------
async def measure(args: argparse.Namespace, mode: str, sessions: int) -> dict:
    driver = ProcessDriver(args, sessions) if mode == "process" else GrpcDriver(args, sessions)
    started = time.perf_counter()
    await driver.start()
    processes = {name: psutil.Process(pid) for name, pid in driver.pids.items()}
    print(f"[{mode} {sessions}] started in {time.perf_counter() - started:.1f} s", flush=True)
    # Warm up: every session through its first turn, and the pipeline full.
    while driver.turns < sessions:
        check(driver)
        await asyncio.sleep(0.2)
    base_tokens = await driver.generated()
    result: dict = {"mode": mode, "sessions": sessions, "reply_tokens": args.reply_tokens,
                    "note": NOTE, "repeats": []}  # fmt: skip
    for _ in range(args.repeats):
        window = Window(processes)
        wall = time.perf_counter()
        first = await driver.generated()
        goal = max(args.min_tokens, args.turns * sessions * args.reply_tokens)
        while (now := await driver.generated()) - first < goal:
            check(driver)
            await asyncio.sleep(0.2)
        cpu = window.seconds()
        tokens = now - first
        us = {name: round(1e6 * s / tokens, 3) for name, s in cpu.items()}
        wall_s = time.perf_counter() - wall
        result["repeats"].append({"tokens": tokens, "wall_s": round(wall_s, 2),
                                  "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
                                  "us_per_token": us})  # fmt: skip
        print(f"[{mode} {sessions}] {tokens} tokens in {wall_s:.1f} s wall: "
              + ", ".join(f"{k} {v:.2f} us/token" for k, v in us.items()), flush=True)  # fmt: skip
    for name in processes:
        values = sorted(r["us_per_token"][name] for r in result["repeats"])
        result[f"{name}_us_per_token_median"] = values[len(values) // 2]
        result[f"{name}_us_per_token_range"] = [values[0], values[-1]]
    if args.profile:
        out = Path(tempfile.mkdtemp()) / f"pyspy_{mode}_{sessions}.txt"
        spy = py_spy(driver.pids["engine"], args.profile_s, out)
        _, err = await asyncio.to_thread(spy.communicate)
        if out.exists():
            result["profile_engine"] = summarise_profile(out)
            for row in result["profile_engine"]["top"][:12]:
                print(f"    {100 * row['share']:5.1f}%  {row['frame']}", flush=True)
        else:
            result["profile_engine"] = {"error": err.decode()[-500:]}
    result["tokens_since_warm"] = (await driver.generated()) - base_tokens
    await driver.close()
    return result


def commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--modes", nargs="+", default=["process", "grpc"],
                        choices=["process", "grpc"])  # fmt: skip
    parser.add_argument("--reply-tokens", type=int, default=64, help="mean tokens per reply")
    parser.add_argument(
        "--turns", type=float, default=2.0, help="each window: this many turns per session"
    )
    parser.add_argument(
        "--min-tokens", type=int, default=1_000_000, help="each window: at least this many tokens"
    )
    parser.add_argument("--repeats", type=int, default=3, help="windows per run")
    parser.add_argument("--prefill-budget", type=int, default=2048)
    parser.add_argument("--profile", action="store_true", help="py-spy the engine child")
    parser.add_argument("--profile-s", type=float, default=15.0)
    parser.add_argument("--out", help="write the results here (JSON)")
    parser.add_argument("--replica-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replica_child:
        asyncio.run(replica_child(Path(args.replica_child), args.sessions[0], args.prefill_budget))
        return {}
    print(NOTE, flush=True)
    runs = []
    for mode in args.modes:
        for sessions in args.sessions:
            runs.append(asyncio.run(measure(args, mode, sessions)))
    report = {
        "benchmark": "host_bench",
        "note": NOTE,
        "device": f"CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "command": "python bench/host_bench.py " + " ".join(argv or sys.argv[1:]),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
