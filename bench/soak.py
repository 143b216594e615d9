"""A compressed-months soak of a real `sinkserve serve`: does anything grow while nothing changes?

An endless-session service is judged after weeks of uptime. This runs one on this machine (tiny
model, 2 replicas, the SQLite store, `--session-ttl-s` short so weeks of sessions pass in minutes)
and, for `--minutes`:

- opens sessions continuously (`--open-per-s`), takes one short turn on each and abandons it (no
  Close): thousands of sessions nobody will come back for, which must leave nothing behind;
- keeps one blocking client (`sinkserve.client.Session`) and one asyncio client (`AsyncSession`)
  on one session each, taking turns; every `--resume-every-s` their connection is cut (each talks
  through a TCP relay here that drops its connections, like a flaky network), so the client
  library resumes the session on a new stream, which must come back exactly where its last
  TurnEnd left it;
- SIGKILLs a replica process every `--kill-every-s`, then waits until Stats shows it replaced;
- samples, every `--sample-s`, the store's rows and file bytes (the file, its WAL and shared
  memory) and the RSS, threads and open fds of every process of the service and of this client.

It writes the samples and events as JSON and plots them over time (PNG). `--check` exits 1 unless
the bounds hold: store rows and bytes flat after the TTL, RSS, threads and fds flat per process
role, no resumed session lost or behind a turn end it was sent, no ALREADY_EXISTS or NOT_FOUND for
a live session. tests/test_soak.py runs a short version in CI; docs/reliability.md has the hour.

    python bench/soak.py --minutes 60 --json soak.json --plot soak.png --check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from sinkserve.client import AsyncSession, ResumePolicy, Session, SessionError, StreamResumed
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

SHORT = pb.GenerationParams(max_new_tokens=4, temperature=0.0)
# Codes a live session must never see: the conversation reported gone, or a restore colliding.
NEVER_FOR_A_LIVE_SESSION = ("NOT_FOUND", "ALREADY_EXISTS")


@dataclass
class SoakConfig:
    minutes: float = 60.0
    ttl_s: float = 120.0  # session_ttl_s: abandoned sessions must be gone this long after
    idle_offload_s: float = 5.0  # abandoned sessions leave their slot (and are handed back) soon
    open_per_s: float = 2.0
    kill_every_s: float = 600.0
    resume_every_s: float = 60.0
    sample_s: float = 10.0
    replicas: int = 2
    slots: int = 64
    port: int = 0  # 0: a free one
    workdir: str = ""  # the store, the state directory, the service's log; "" a temporary one


@dataclass
class Record:
    started: float = field(default_factory=time.time)
    samples: list[dict[str, Any]] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    opened: int = 0
    abandoned: int = 0
    open_errors: Counter = field(default_factory=Counter)
    resumes: Counter = field(default_factory=Counter)  # per client
    turns: Counter = field(default_factory=Counter)
    resumer_errors: Counter = field(default_factory=Counter)  # "client CODE"
    sessions_lost: int = 0
    behind_turn_end: int = 0
    position_errors: int = 0

    def t(self) -> float:
        return time.time() - self.started


# -- the service -------------------------------------------------------------------------------------
class Service:
    """`sinkserve serve` in its own process group; its output goes to a log file."""

    def __init__(self, config: SoakConfig, workdir: Path) -> None:
        self.store = workdir / "sessions.db"
        self.address = f"127.0.0.1:{config.port}"
        env = {
            **os.environ,
            "SINKSERVE_STATE_DIR": str(workdir / "state"),
            "SINKSERVE_RESUME_SECRET": "soak-" + os.urandom(16).hex(),
        }
        command = [
            sys.executable, "-m", "sinkserve.cli", "serve", "--model", "tiny",
            "--replicas", str(config.replicas), "--slots", str(config.slots), "--window", "60",
            "--host", "127.0.0.1", "--port", str(config.port), "--gateways", "1",
            "--session-store", f"sqlite:///{self.store}", "--session-ttl-s", str(config.ttl_s),
            "--idle-offload-s", str(config.idle_offload_s),
        ]  # fmt: skip
        self.log = open(workdir / "serve.log", "w")  # noqa: SIM115 (kept open while it runs)
        self.process = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=subprocess.PIPE,
            stderr=self.log, text=True,
        )  # fmt: skip
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.log.write(line)
            self.log.flush()
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                message = f"sinkserve serve printed no 'ready' in {timeout_s:.0f} s"
                raise RuntimeError(message) from None
            if line is None:
                raise RuntimeError(f"sinkserve serve exited before 'ready' (see {self.log.name})")
            if line.startswith("ready"):
                return

    def processes(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        return []

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


async def stats(address: str) -> pb.StatsResponse | None:
    async with grpc.aio.insecure_channel(address) as channel:
        with contextlib.suppress(grpc.aio.AioRpcError):
            return await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=10)
    return None


# -- a flaky network ---------------------------------------------------------------------------------
class Relay:
    """A TCP relay to the gateway whose connections `cut()` drops, as a flaky network would."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.writers: set[asyncio.StreamWriter] = set()
        self.address = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    def cut(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        self.server.close()


# -- the clients -------------------------------------------------------------------------------------
async def abandon_sessions(config: SoakConfig, address: str, record: Record, until: float) -> None:
    """Open a session, take one short turn, leave without Close; `open_per_s` of them."""
    gate = asyncio.Semaphore(16)
    async with grpc.aio.insecure_channel(address) as channel:

        async def one(i: int) -> None:
            async with gate:
                try:
                    session = await AsyncSession.open(address, channel=channel, resume_policy=None)
                    record.opened += 1
                    await session.reply(text=f"a passing visitor {i}", generate=SHORT)
                    await session.disconnect()
                    record.abandoned += 1
                except SessionError as error:  # during a kill: UNAVAILABLE; refused: counted
                    record.open_errors[error.code.name] += 1

        tasks: set[asyncio.Task] = set()
        i = 0
        while time.monotonic() < until:
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            await asyncio.sleep(1.0 / config.open_per_s)
        await asyncio.gather(*tasks)


class Conversation:
    """What a resuming client checks: each resume comes back at the last TurnEnd it was sent (no
    turn was in flight when the connection was cut), and each turn continues the stream."""

    def __init__(self, name: str, record: Record) -> None:
        self.name, self.record = name, record
        self.ended_at = 0  # stream position of the last TurnEnd

    def resumed(self, position: int) -> None:
        self.record.resumes[self.name] += 1
        if position < self.ended_at:  # past it is fine: the cut turn's end, if it was running
            self.record.behind_turn_end += 1
        self.ended_at = position

    def turn(self, end: pb.TurnEnd) -> None:
        self.record.turns[self.name] += 1
        if end.stream_position != self.ended_at + end.input_tokens + end.generated_tokens:
            self.record.position_errors += 1
        self.ended_at = end.stream_position

    def failed(self, error: SessionError) -> None:
        self.record.resumer_errors[f"{self.name} {error.code.name}"] += 1
        self.record.sessions_lost += 1


def blocking_client(relay: Relay, record: Record, turn_now: threading.Event, stop: threading.Event):
    """One `Session` for the whole run, resumed by the client library after every cut."""
    talk = Conversation("blocking", record)
    session = None
    while not stop.is_set():
        if session is None:
            try:
                session = Session.open(relay.address, resume_policy=ResumePolicy())
            except SessionError as error:
                record.resumer_errors[f"blocking open {error.code.name}"] += 1
                stop.wait(1.0)
                continue
            talk.ended_at = session.opened.stream_position
        if not turn_now.wait(1.0):
            continue
        turn_now.clear()
        for _ in range(3):  # a cut turn raises StreamResumed: the session goes on, turn again
            try:
                talk.turn(session.reply(text="still here", generate=SHORT).end)
                break
            except StreamResumed as resumed:
                talk.resumed(resumed.stream_position)
            except SessionError as error:
                talk.failed(error)
                session = None
                break
    if session is not None:
        with contextlib.suppress(SessionError):
            session.close()


async def asyncio_client(relay: Relay, record: Record, turn_now: asyncio.Event, until: float):
    talk = Conversation("asyncio", record)
    session = None
    while time.monotonic() < until:
        if session is None:
            try:
                session = await AsyncSession.open(relay.address, resume_policy=ResumePolicy())
            except SessionError as error:
                record.resumer_errors[f"asyncio open {error.code.name}"] += 1
                await asyncio.sleep(1.0)
                continue
            talk.ended_at = session.opened.stream_position
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(turn_now.wait(), 1.0)
        if not turn_now.is_set():
            continue
        turn_now.clear()
        for _ in range(3):
            try:
                talk.turn((await session.reply(text="still here", generate=SHORT)).end)
                break
            except StreamResumed as resumed:
                talk.resumed(resumed.stream_position)
            except SessionError as error:
                talk.failed(error)
                session = None
                break
    if session is not None:
        with contextlib.suppress(SessionError):
            await session.close()


# -- faults and measurements -------------------------------------------------------------------------
async def kill_replicas(config: SoakConfig, address: str, record: Record, until: float) -> None:
    """Every kill_every_s: SIGKILL one replica's process, then wait until Stats shows it
    replaced and every replica serving."""
    while time.monotonic() + config.kill_every_s < until:
        await asyncio.sleep(config.kill_every_s)
        reply = await stats(address)
        if reply is None or not reply.replicas:
            continue
        victim = reply.replicas[len(record.kills) % len(reply.replicas)]
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGKILL)
        kill = {"t": record.t(), "replica": victim.replica_id, "pid": victim.pid}
        record.kills.append(kill)
        while time.monotonic() < until:
            reply = await stats(address)
            pids = {r.pid for r in reply.replicas} if reply else set()
            if reply and len(reply.replicas) >= config.replicas and victim.pid not in pids:
                kill["replaced_after_s"] = record.t() - kill["t"]
                break
            await asyncio.sleep(1.0)


def role(process: psutil.Process, own: int) -> str:
    """What a process is, stable across restarts: a replica killed and replaced keeps its role."""
    if process.pid == own:
        return "soak client"
    try:
        command = process.cmdline()
        name = process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if command and command[0].startswith("ray::"):
        # ray::ServeReplica:sinkserve:SessionReplica, without the task it runs now (".method")
        return command[0].split(" ")[0].split(".")[0]
    if name in ("raylet", "gcs_server"):
        return name
    joined = " ".join(command)
    if "sinkserve.cli" in joined:
        return "sinkserve serve"
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = process.parent()
        if parent is not None and parent.cmdline()[:1] and "ServeReplica" in parent.cmdline()[0]:
            return "engine"
    return name


def sample(service: Service, record: Record) -> None:
    rows = None
    with contextlib.suppress(sqlite3.Error):
        connection = sqlite3.connect(f"file:{service.store}?mode=ro", uri=True, timeout=5)
        try:
            rows = connection.execute("SELECT count(*) FROM sessions").fetchone()[0]
        finally:
            connection.close()
    store_bytes = sum(
        path.stat().st_size
        for path in (service.store, Path(f"{service.store}-wal"), Path(f"{service.store}-shm"))
        if path.exists()
    )
    own = os.getpid()
    processes = []
    for process in [psutil.Process(own), *service.processes()]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied), process.oneshot():
            processes.append(
                {
                    "pid": process.pid,
                    "role": role(process, own),
                    "rss": process.memory_info().rss,
                    "threads": process.num_threads(),
                    "fds": process.num_fds(),
                }
            )
    record.samples.append(
        {"t": record.t(), "store_rows": rows, "store_bytes": store_bytes, "processes": processes}
    )


async def soak(config: SoakConfig) -> dict[str, Any]:
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="sinkserve-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not config.port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            config.port = probe.getsockname()[1]
    record = Record()
    service = Service(config, workdir)
    try:
        await asyncio.to_thread(service.wait_ready)
        record.started = time.time()
        until = time.monotonic() + 60 * config.minutes
        relays = [Relay(service.address), Relay(service.address)]
        for relay in relays:
            await relay.start()
        stop = threading.Event()
        blocking_turn, asyncio_turn = threading.Event(), asyncio.Event()
        blocking = asyncio.create_task(
            asyncio.to_thread(blocking_client, relays[0], record, blocking_turn, stop)
        )
        tasks = [
            asyncio.create_task(abandon_sessions(config, service.address, record, until)),
            asyncio.create_task(asyncio_client(relays[1], record, asyncio_turn, until)),
            asyncio.create_task(kill_replicas(config, service.address, record, until)),
        ]
        next_resume = time.monotonic() + config.resume_every_s
        while time.monotonic() < until:
            await asyncio.to_thread(sample, service, record)
            if time.monotonic() >= next_resume:  # cut both clients' connections, then a turn
                for relay in relays:
                    relay.cut()
                blocking_turn.set()
                asyncio_turn.set()
                next_resume += config.resume_every_s
            else:  # a turn between cuts too, so the sessions stay in use
                blocking_turn.set()
                asyncio_turn.set()
            await asyncio.sleep(min(config.sample_s, max(0.0, until - time.monotonic())))
        stop.set()
        await asyncio.gather(*tasks, blocking)
        await asyncio.to_thread(sample, service, record)
        for relay in relays:
            await relay.close()
    finally:
        service.stop()
    # Not asdict(record): it rebuilds a Counter from (key, value) pairs, counting the pairs.
    plain = {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(record).items()}
    data = {"config": asdict(config), "workdir": str(workdir), **plain}
    data["violations"] = check(data)
    return data


# -- the bounds --------------------------------------------------------------------------------------
def _windows(data: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The samples of the first and last third after the warm-up (twice the TTL plus the idle
    offload, and at least a quarter of the run): what "flat" compares."""
    config = data["config"]
    samples = data["samples"]
    if not samples:
        return [], []
    warm = max(2 * config["ttl_s"] + config["idle_offload_s"], 15 * config["minutes"])
    steady = [s for s in samples if s["t"] >= warm]
    third = max(1, len(steady) // 3)
    return steady[:third], steady[-third:]


def _by_role(samples: list[dict], key: str) -> dict[str, list[float]]:
    """Per sample, the sum of `key` over each role's processes."""
    series: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        sums: dict[str, float] = defaultdict(float)
        for process in s["processes"]:
            sums[process["role"]] += process[key]
        for name, total in sums.items():
            series[name].append(total)
    return series


# Flat: the last third's median within this of the first third's (a share, plus a floor).
TOLERANCE = {"rss": (0.25, 64 * 2**20), "threads": (0.2, 8), "fds": (0.2, 16)}
ROLES_CHECKED = ("soak client", "sinkserve serve", "raylet", "gcs_server", "engine")


def check(data: dict[str, Any]) -> list[str]:
    """What broke the bounds, one line each (empty: none)."""
    problems = []
    first, last = _windows(data)
    if len(first) < 2 or len(last) < 2:
        return ["too few samples after the warm-up to judge"]
    for key, (share, floor) in (("store_rows", (0.5, 20)), ("store_bytes", (0.5, 2 * 2**20))):
        before = max(s[key] or 0 for s in first)
        after = max(s[key] or 0 for s in last)
        if after > before * (1 + share) + floor:
            problems.append(f"{key} grew after the TTL: max {before} then {after}")
    for key, (share, floor) in TOLERANCE.items():
        early, late = _by_role(first, key), _by_role(last, key)
        for name in sorted(set(early) & set(late)):
            if name not in ROLES_CHECKED and not name.startswith("ray::Serve"):
                continue  # idle Ray workers come and go: not a process that lives on
            before, after = statistics.median(early[name]), statistics.median(late[name])
            if after > before * (1 + share) + floor:
                problems.append(f"{name} {key} grew: median {before:.0f} then {after:.0f}")
    if data["sessions_lost"]:
        problems.append(f"{data['sessions_lost']} resuming sessions lost {data['resumer_errors']}")
    if data["behind_turn_end"]:
        problems.append(f"{data['behind_turn_end']} resumes came back behind a turn end")
    if data["position_errors"]:
        problems.append(f"{data['position_errors']} position errors")
    never = {
        k: v for k, v in data["resumer_errors"].items() if k.split()[-1] in NEVER_FOR_A_LIVE_SESSION
    }
    if never:
        problems.append(f"a live session got {never}")
    if not all(data["resumes"].get(name) for name in ("blocking", "asyncio")):
        problems.append(f"a client never resumed: {dict(data['resumes'])}")
    if any("replaced_after_s" not in kill for kill in data["kills"]):
        problems.append(f"a killed replica was not replaced: {data['kills']}")
    return problems


# -- the picture -------------------------------------------------------------------------------------
def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = data["samples"]
    ts = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 13), sharex=True, layout="constrained")
    axes[0].plot(ts, [s["store_rows"] or 0 for s in samples], label="rows")
    axes[0].set_ylabel("store rows")
    ax = axes[0].twinx()
    ax.plot(ts, [s["store_bytes"] / 2**20 for s in samples], color="tab:orange", label="MiB")
    ax.set_ylabel("store file + WAL (MiB)")
    for axis, key, unit, scale in (
        (axes[1], "rss", "RSS (MiB)", 2**20),
        (axes[2], "threads", "threads", 1),
        (axes[3], "fds", "open fds", 1),
    ):
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for s in samples:
            sums: dict[str, float] = defaultdict(float)
            for process in s["processes"]:
                sums[process["role"]] += process[key]
            for name, total in sums.items():
                series[name].append((s["t"] / 60, total / scale))
        for name, points in sorted(series.items()):
            if name in ROLES_CHECKED or name.startswith("ray::Serve"):
                axis.plot([p[0] for p in points], [p[1] for p in points], label=name)
        axis.set_ylabel(unit)
    axes[3].legend(fontsize="x-small", ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    for axis in axes[:4]:
        for kill in data["kills"]:
            axis.axvline(kill["t"] / 60, color="tab:red", linestyle=":", linewidth=1)
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    axes[3].set_xlabel("minutes (red: a replica killed)")
    config = data["config"]
    fig.suptitle(
        f"soak: {config['minutes']:.0f} min, TTL {config['ttl_s']:.0f} s, {data['opened']} "
        f"sessions opened and abandoned, {len(data['kills'])} replicas killed, "
        f"{sum(data['resumes'].values())} resumes, {sum(data['turns'].values())} turns, lost "
        f"{data['sessions_lost']}\nbounds: {'held' if not data['violations'] else 'BROKEN'}"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    defaults = SoakConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--json", help="write the record here")
    parser.add_argument("--plot", help="write a PNG of the samples over time here")
    parser.add_argument("--check", action="store_true", help="exit 1 if a bound broke")
    args = vars(parser.parse_args())
    out, picture, checked = args.pop("json"), args.pop("plot"), args.pop("check")
    data = asyncio.run(soak(SoakConfig(**args)))
    if out:
        Path(out).write_text(json.dumps(data, indent=1) + "\n")
    if picture:
        plot(data, Path(picture))
    summary = {k: data[k] for k in ("opened", "abandoned", "sessions_lost", "behind_turn_end")}
    summary.update(
        resumes=dict(data["resumes"]),
        kills=len(data["kills"]),
        open_errors=dict(data["open_errors"]),
        resumer_errors=dict(data["resumer_errors"]),
    )
    print("soak:", json.dumps(summary))
    for line in data["violations"]:
        print("bound broken:", line)
    if checked and data["violations"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
