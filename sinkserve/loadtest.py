"""`sinkserve loadtest`: thousands of concurrent endless conversations against a running service.

Every session is opened (ramped), then loops until the duration ends: append a user turn, read the
streamed reply, think, repeat. At the end, turns in flight get at most DRAIN_S to finish and their
sessions to close; sessions still busy then are cut (counted), so a run ends on time whatever the
service does. A stream that breaks is resumed (the client library does it, with backoff, as many
times as it takes within its policy); a session is *lost* only when it cannot be continued. An Open
refused with RESOURCE_EXHAUSTED (more load offered than the service can generate for, answered
cleanly) is a *refusal*, counted apart, with how long the answer took. Before the run, the
service's Stats say how many slots it has: more sessions than slots is worth a warning, and the
report says whether the service was saturated. Latencies go into HDR histograms (microseconds):
  ttft      time from sending a turn to its first reply tokens
  refusal   time from sending an Open to its RESOURCE_EXHAUSTED
  itl       inter-token latency: the gap before each Tokens message, spread over its tokens
  failover  from a stream breaking to the first reply token after the session resumed
  resume    from a stream breaking to the session resumed on a new stream
The server's Stats are sampled through the run (KV bytes, process memory) for the memory check.
With `chaos_kill_every_s`, a replica process (or its engine process) on this host is SIGKILLed
that often, to measure what faults cost.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from hdrh.histogram import HdrHistogram

from sinkserve.client import AsyncSession, SessionError, StreamResumed
from sinkwire.channels import Credentials, aio_channel
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

T = TypeVar("T")

# After the duration, turns in flight get this long to finish and their sessions to close.
DRAIN_S = 10.0

WORDS = [
    "the",
    "stream",
    "goes",
    "on",
    "and",
    "every",
    "session",
    "keeps",
    "its",
    "sinks",
    "while",
    "the",
    "window",
    "rolls",
    "forward",
    "with",
    "each",
    "new",
    "token",
    "so",
    "memory",
    "stays",
    "flat",
    "and",
    "the",
    "model",
    "stays",
    "stable",
    "for",
    "days",
    "of",
    "chat",
    "logs",
    "and",
    "documents",
    "that",
    "never",
    "end",
]


@dataclass
class LoadConfig:
    target: str
    sessions: int
    duration_s: float
    ramp_s: float = 10.0
    think_s: tuple[float, float] = (0.5, 1.5)
    max_new_tokens: int = 24
    temperature: float = 0.8
    top_p: float = 0.95
    words_per_turn: tuple[int, int] = (4, 16)
    channels: int = 16
    stats_interval_s: float = 2.0
    seed: int = 0
    # A reply stream silent this long counts as DEADLINE_EXCEEDED (and the session is resumed),
    # so a stalled server shows up as errors instead of a load test that never ends.
    stall_timeout_s: float = 60.0
    credentials: Credentials | None = None  # None: from the environment (SINKSERVE_API_KEY, ...)
    # Every this many seconds (after the ramp), SIGKILL one replica process on this host (or its
    # engine process, chaos_target="engine"; one then the other, "alternate"; or the gateway that
    # answers, "gateway"); None: no chaos.
    chaos_kill_every_s: float | None = None
    chaos_target: str = "replica"
    # At most this many kills (None: until the run ends), so a drill can end with a quiet stretch
    # in which the killed processes come back and every session shows it fails over.
    chaos_kills: int | None = None
    # "grpc", or "openai": the same conversations through POST /v1/responses
    # (sinkserve/loadtest_http.py) at `openai_url` (default: the target's host, port 8100).
    protocol: str = "grpc"
    openai_url: str | None = None


@dataclass
class LoadStats:
    """Everything the run measured (merged across sessions)."""

    started: float = field(default_factory=time.monotonic)
    opened: int = 0
    lost: int = 0
    refused: int = 0  # opens answered RESOURCE_EXHAUSTED: load over capacity, not a fault
    refusal_details: str = ""  # the first refusal's message (its retry hint)
    cut: int = 0  # sessions still busy DRAIN_S after the duration: stopped without a close
    open_failed: int = 0  # opens that failed otherwise
    resumed: int = 0
    lost_tokens: int = 0  # reply tokens seen by clients but not in their rebuilt sessions
    # Turns whose end did not continue the stream exactly where the session stood before them
    # (its position at the previous turn end, or where it resumed).
    position_errors: int = 0
    # Resumes that came back at a stream position behind a TurnEnd the session was sent: a
    # turn the client saw end, lost (a TurnEnd must mean the turn is durable).
    behind_turn_end: int = 0
    failing_over: int = 0  # sessions whose stream broke and that have no reply token since
    last_turn_end: dict[int, float] = field(default_factory=dict)  # session index -> when
    sampler_errors: Counter = field(default_factory=Counter)  # the Stats sampler's own
    # Set by the chaos drill once every kill's replacement serves and no session is failing
    # over: conversations end then (the duration is the cap).
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    kills: list[dict[str, Any]] = field(default_factory=list)
    turns: int = 0
    tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    # The first error's details for each status code: what a reader needs when a run fails
    # (a dead target says "failed to connect to all addresses", not only UNAVAILABLE).
    error_details: dict[str, str] = field(default_factory=dict)
    ttft: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000_000, 3))
    itl: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000_000, 3))
    failover: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000_000, 3))
    resume: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000_000, 3))
    refusal: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000_000, 3))
    timeline: list[dict[str, Any]] = field(default_factory=list)
    server: list[dict[str, Any]] = field(default_factory=list)
    active: int = 0
    elapsed: float = 0.0
    _window_tokens: int = 0
    _window_ttft: list[float] = field(default_factory=list)

    def error(self, error: SessionError | grpc.StatusCode, details: str = "") -> None:
        code = error if isinstance(error, grpc.StatusCode) else error.code
        if not details and isinstance(error, SessionError):
            details = error.details
        self.errors[code.name] += 1
        if details and code.name not in self.error_details:
            self.error_details[code.name] = " ".join(details.split())


async def _within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """`awaitable`, or SessionError(DEADLINE_EXCEEDED) if it stays silent for `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await awaitable
    except TimeoutError:
        raise SessionError(grpc.StatusCode.DEADLINE_EXCEEDED, "the server stalled") from None


async def _converse(
    config: LoadConfig, stats: LoadStats, channel: grpc.aio.Channel, index: int, deadline: float
) -> None:
    rng = random.Random(config.seed * 1_000_003 + index)
    stall = config.stall_timeout_s
    await asyncio.sleep(config.ramp_s * index / max(1, config.sessions))
    asked = time.monotonic()
    try:
        session = await _within(AsyncSession.open(config.target, channel=channel), stall)
    except SessionError as error:
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            stats.refused += 1
            stats.refusal.record_value(max(1, int((time.monotonic() - asked) * 1e6)))
            stats.refusal_details = stats.refusal_details or error.details
        else:
            stats.error(error)
            stats.open_failed += 1
        return
    except asyncio.CancelledError:  # still opening at the end of the drain: cut
        stats.cut += 1
        raise
    stats.opened += 1
    stats.active += 1
    params = pb.GenerationParams(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p
    )
    failed_at: float | None = None  # a stream broke then; the next first token ends the failover
    position = session.opened.stream_position  # where the session's stream stands
    ended_at = position  # the stream position of the last TurnEnd it was sent
    try:
        while time.monotonic() < deadline and not stats.settled.is_set():
            words = rng.randint(*config.words_per_turn)
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            try:
                first_token_at, end = await _turn(session, text, params, stats, stall)
            except StreamResumed as resumed:  # the client library resumed it: the turn was cut
                stats.error(resumed.cause)
                stats.resumed += 1
                stats.lost_tokens += resumed.lost_tokens
                stats.behind_turn_end += resumed.stream_position < ended_at
                stats.failing_over += failed_at is None
                failed_at = failed_at or resumed.failed_at
                stats.resume.record_value(max(1, int((time.monotonic() - failed_at) * 1e6)))
                position = resumed.stream_position
                continue
            except SessionError as error:
                stats.error(error)
                stats.failing_over += failed_at is None
                failed_at = failed_at or time.monotonic()
                resumed = await _resume(config, session, channel)
                if resumed is None:
                    stats.lost += 1
                    return
                session = resumed
                stats.resumed += 1
                position = session.opened.stream_position
                stats.behind_turn_end += position < ended_at
                continue
            if end is None or end.stream_position != (
                position + end.input_tokens + end.generated_tokens
            ):
                stats.position_errors += 1
            else:
                position = end.stream_position
            if end is not None:
                ended_at = end.stream_position
                stats.last_turn_end[index] = time.monotonic()
            if failed_at is not None and end is not None:  # a turn ended since it broke
                if first_token_at is not None:
                    failover_us = int((first_token_at - failed_at) * 1e6)
                    stats.failover.record_value(max(1, failover_us))
                stats.failing_over -= 1
                failed_at = None
            await asyncio.sleep(rng.uniform(*config.think_s))
        try:
            await _within(session.close(), stall)
        except SessionError as error:
            stats.error(error)
    except asyncio.CancelledError:  # still busy at the end of the drain: cut
        stats.cut += 1
        await session.disconnect()
        raise
    finally:
        stats.active -= 1
        stats.last_turn_end.pop(index, None)


async def _resume(
    config: LoadConfig, session: AsyncSession, channel: grpc.aio.Channel
) -> AsyncSession | None:
    """Continue a session the client library did not resume itself (a stalled stream, or one
    that failed with a code it does not retry): a few tries on a new stream."""
    await session.disconnect()
    for delay in (0.1, 0.5, 2.0):
        await asyncio.sleep(delay)
        try:
            return await _within(
                AsyncSession.resume(
                    config.target, session.session_id, session.resume_token, channel=channel
                ),
                config.stall_timeout_s,
            )
        except SessionError as error:
            if error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                return None
    return None


async def _turn(
    session: AsyncSession,
    text: str,
    params: pb.GenerationParams,
    stats: LoadStats,
    stall_timeout_s: float,
) -> tuple[float | None, pb.TurnEnd]:
    """One turn; returns when its first reply token came (time.monotonic()) and its end."""
    sent = time.monotonic()
    last = first = end = None
    replies = aiter(session.append(chat=("user", text), generate=params))
    while True:
        message = await _within(anext(replies, None), stall_timeout_s)
        if message is None:
            break
        if message.HasField("turn_end"):
            end = message.turn_end
        if message.HasField("tokens"):
            now = time.monotonic()
            count = len(message.tokens.ids)
            if last is None:
                first = now
                ttft = now - sent
                stats.ttft.record_value(max(1, int(ttft * 1e6)))
                stats._window_ttft.append(ttft)
            elif count:
                gap = int((now - last) * 1e6 / count)
                for _ in range(count):
                    stats.itl.record_value(max(1, gap))
            last = now
            stats.tokens += count
            stats._window_tokens += count
    stats.turns += 1
    return first, end


async def _chaos(
    config: LoadConfig, stats: LoadStats, stop: asyncio.Event, deadline: float
) -> None:
    """SIGKILL one replica process on this host (or its engine, or a gateway), driven by what the
    service reports, not by the clock alone: `chaos_kill_every_s` after the ramp, kill; wait until
    Stats shows the killed process replaced and every replica serving again; wait
    `chaos_kill_every_s` more; kill again. With `chaos_kills`, after the last kill's replacement
    serves and no session is still failing over, `stats.settled` ends the run (the duration stays
    its cap)."""
    rng = random.Random(config.seed)
    await asyncio.sleep(config.ramp_s)
    host = socket.gethostname()
    async with aio_channel(config.target, config.credentials) as channel:
        stub = pb_grpc.StreamingLLMStub(channel)

        async def wait(seconds: float) -> bool:
            """False once the run stops or reaches its deadline."""
            seconds = min(seconds, deadline - time.monotonic())
            if seconds <= 0:
                return False
            try:
                await asyncio.wait_for(stop.wait(), seconds)
                return False
            except TimeoutError:
                return True

        async def ask() -> pb.StatsResponse | None:
            try:
                return await stub.Stats(pb.StatsRequest(), timeout=5.0)
            except grpc.aio.AioRpcError:
                return None

        replicas = 0
        while await wait(config.chaos_kill_every_s):
            if len(stats.kills) == config.chaos_kills:
                break
            reply = await ask()
            if reply is None:
                continue
            replicas = max(replicas, len(reply.replicas))
            target = config.chaos_target
            if target == "alternate":  # a replica's process, then an engine process, and so on
                target = ("replica", "engine")[len(stats.kills) % 2]
            if target == "gateway":  # the one that answered: its clients must reconnect
                if reply.gateway_hostname != host or not reply.gateway_pid:
                    continue
                victim_id, pid = f"gateway-{reply.gateway_pid}", reply.gateway_pid
            else:
                local = [r for r in reply.replicas if r.hostname == host and r.pid]
                if not local:
                    continue
                victim = rng.choice(local)
                victim_id = victim.replica_id
                pid = victim.engine_pid if target == "engine" else victim.pid
            if not pid:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kill = {"t": time.monotonic() - stats.started, "victim": victim_id, "target": target}
            kill["pid"] = pid
            stats.kills.append(kill)
            # Until the killed process is replaced and as many replicas serve as before.
            while True:
                reply = await ask()
                if reply is not None and len(reply.replicas) >= replicas:
                    pids = {p for r in reply.replicas for p in (r.pid, r.engine_pid)}
                    if pid not in pids and reply.gateway_pid != pid:
                        kill["replaced_after_s"] = time.monotonic() - stats.started - kill["t"]
                        break
                if not await wait(0.5):
                    return
        if len(stats.kills) == config.chaos_kills and "replaced_after_s" in stats.kills[-1]:
            # Every session back and answering: none failing over, and each one has ended a
            # turn since the last replacement served (a session that was thinking through the
            # kill finds its stream broken only at its next turn).
            served = stats.started + stats.kills[-1]["t"] + stats.kills[-1]["replaced_after_s"]

            def settled() -> bool:
                ends = stats.last_turn_end.values()
                return stats.failing_over == 0 and all(t > served for t in ends)

            while not settled() and await wait(0.2):
                pass
            if settled():
                stats.settled.set()


_NOT_ADMIN = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


async def _sample_server(config: LoadConfig, stats: LoadStats, stop: asyncio.Event) -> None:
    async with aio_channel(config.target, config.credentials) as channel:
        stub = pb_grpc.StreamingLLMStub(channel)
        while True:
            try:
                reply = await stub.Stats(pb.StatsRequest(), timeout=5.0)
                stats.server.append(
                    {
                        "t": time.monotonic() - stats.started,
                        "sessions": reply.sessions,
                        "slots_used": reply.slots_used,
                        "slots_total": reply.slots_total,
                        "prefill_tokens": sum(r.prefill_tokens for r in reply.replicas),
                        "decode_tokens": sum(r.decode_tokens for r in reply.replicas),
                        "kv_bytes": sum(r.kv_bytes for r in reply.replicas),
                        "replica_rss_bytes": sum(r.process_rss_bytes for r in reply.replicas),
                        "gateway_rss_bytes": reply.gateway_rss_bytes,
                        "generated_tokens": sum(r.generated_tokens for r in reply.replicas),
                    }
                )
            except grpc.aio.AioRpcError as error:
                if error.code() in _NOT_ADMIN:  # server figures need an admin key: go without
                    return
                # A Stats call that timed out on a busy or failing-over service: the
                # sampler's own, not a session's error.
                stats.sampler_errors[error.code().name] += 1
            try:
                await asyncio.wait_for(stop.wait(), config.stats_interval_s)
                return
            except TimeoutError:
                pass


async def _progress(stats: LoadStats, stop: asyncio.Event, live) -> None:
    last = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        now = time.monotonic()
        window = stats._window_ttft
        stats._window_ttft = []
        point = {
            "t": now - stats.started,
            "active_sessions": stats.active,
            "tokens_per_s": stats._window_tokens / (now - last),
            "ttft_ms_p50": 1000 * sorted(window)[len(window) // 2] if window else None,
            "turns": stats.turns,
        }
        stats._window_tokens = 0
        last = now
        stats.timeline.append(point)
        if live is not None:
            live(point, stats)


async def service_slots(config: LoadConfig) -> int | None:
    """The service's cache slots (its Stats), or None if they cannot be read (no admin key)."""
    async with aio_channel(config.target, config.credentials) as channel:
        try:
            reply = await pb_grpc.StreamingLLMStub(channel).Stats(pb.StatsRequest(), timeout=5.0)
        except grpc.aio.AioRpcError:
            return None
    return reply.slots_total


def oversubscription_warning(sessions: int, slots: int | None) -> str | None:
    """What to tell a user who offers more sessions than the service has slots."""
    if slots is None or sessions <= slots:
        return None
    return (
        f"{sessions} sessions for {slots} cache slots: the service generates for at most {slots} "
        "conversations at a time and refuses the rest (RESOURCE_EXHAUSTED, counted as refused "
        "opens), so this run measures a saturated service; --sessions "
        f"{slots} or fewer measures one with room"
    )


async def run(config: LoadConfig, live=None) -> LoadStats:
    """Run the load; `live(point, stats)` is called once a second for progress output. The run
    ends at most DRAIN_S after the ramp and the duration."""
    stats = LoadStats()
    stop = asyncio.Event()
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_concurrent_streams", 100_000)]
    channels = [
        aio_channel(config.target, config.credentials, options) for _ in range(config.channels)
    ]
    sampler = asyncio.create_task(_sample_server(config, stats, stop))
    progress = asyncio.create_task(_progress(stats, stop, live))
    background = [sampler, progress]
    deadline = time.monotonic() + config.ramp_s + config.duration_s
    if config.chaos_kill_every_s:
        background.append(asyncio.create_task(_chaos(config, stats, stop, deadline)))
    converse, http = _converse, None
    if config.protocol == "openai":
        from sinkserve.loadtest_http import OpenAIConversations

        http = OpenAIConversations(config, WORDS)
        converse = http.converse
    conversations = [
        asyncio.create_task(converse(config, stats, channels[i % len(channels)], i, deadline))
        for i in range(config.sessions)
    ]
    try:
        _, busy = await asyncio.wait(conversations, timeout=deadline + DRAIN_S - time.monotonic())
        for task in busy:
            task.cancel()
        for result in await asyncio.gather(*conversations, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
    finally:
        for task in conversations:
            task.cancel()
        stop.set()
        await asyncio.gather(*background)
        for channel in channels:
            await channel.close()
        if http is not None:
            await http.close()
    stats.elapsed = time.monotonic() - stats.started
    return stats


def _percentiles(histogram: HdrHistogram) -> dict[str, float]:
    if histogram.get_total_count() == 0:
        return {"p50": None, "p95": None, "p99": None, "count": 0}
    return {
        "p50": histogram.get_value_at_percentile(50) / 1000,
        "p95": histogram.get_value_at_percentile(95) / 1000,
        "p99": histogram.get_value_at_percentile(99) / 1000,
        "count": histogram.get_total_count(),
    }


def summary(config: LoadConfig, stats: LoadStats) -> dict[str, Any]:
    server = stats.server
    # Warm-up: the ramp plus a quarter of the run (at most 15 s), while allocators find their size.
    warm_from = config.ramp_s + min(15.0, config.duration_s / 4)
    steady_end = config.ramp_s + config.duration_s  # after it, sessions close and memory drops
    warm = [s for s in server if warm_from <= s["t"] <= steady_end] or server
    measured = config.duration_s  # tokens/s over the steady part (after the ramp)
    # Tokens/s over the steady part only: after the ramp, before sessions close (a slow close
    # must not read as slower serving).
    steady = [p for p in stats.timeline if config.ramp_s < p["t"] <= steady_end]
    steady_tokens = sum(p["tokens_per_s"] for p in steady)
    steady_points = len(steady)

    def growth(key: str) -> float | None:
        """Trend after warm-up: mean of the last quarter of samples against the first quarter
        (single samples of process memory jitter with the allocator)."""
        quarter = max(1, len(warm) // 4)
        first = sum(s[key] for s in warm[:quarter]) / quarter
        last = sum(s[key] for s in warm[-quarter:]) / quarter
        return 100.0 * (last - first) / first if first else None

    slots = max((s["slots_total"] for s in server), default=None)
    full = [s for s in server if slots and s["slots_used"] >= slots]
    return {
        "target": config.target,
        "sessions": config.sessions,
        "slots": slots,
        # Saturated: more wanted a slot than there were: opens refused, or more sessions than
        # slots with every slot taken in most server samples.
        "saturated": bool(stats.refused)
        or (slots is not None and config.sessions > slots and len(full) > len(server) / 2),
        "slots_full_pct": 100.0 * len(full) / len(server) if server else None,
        "sessions_cut_at_end": stats.cut,
        "elapsed_s": stats.elapsed,
        "duration_s": config.duration_s,
        "ramp_s": config.ramp_s,
        "warm_from_s": warm_from,
        "sessions_opened": stats.opened,
        "sessions_lost": stats.lost,
        "sessions_resumed": stats.resumed,
        "opens_refused": stats.refused,
        "refusal_ms": _percentiles(stats.refusal),
        "refusal_details": stats.refusal_details,
        "opens_failed": stats.open_failed,
        "lost_reply_tokens": stats.lost_tokens,
        "position_errors": stats.position_errors,
        "resumed_behind_turn_end": stats.behind_turn_end,
        "chaos_settled": stats.settled.is_set(),
        "sampler_errors": dict(stats.sampler_errors),
        "kills": stats.kills,
        "failover_ms": _percentiles(stats.failover),
        "resume_ms": _percentiles(stats.resume),
        "errors": dict(stats.errors),
        "error_details": dict(stats.error_details),
        "turns": stats.turns,
        "tokens": stats.tokens,
        "tokens_per_s": steady_tokens / steady_points if steady_points else stats.tokens / measured,
        "ttft_ms": _percentiles(stats.ttft),
        "itl_ms": _percentiles(stats.itl),
        "server": {
            "kv_bytes_start": server[0]["kv_bytes"] if server else None,
            "kv_bytes_end": server[-1]["kv_bytes"] if server else None,
            "replica_rss_bytes_start": server[0]["replica_rss_bytes"] if server else None,
            "replica_rss_bytes_after_warmup": warm[0]["replica_rss_bytes"] if warm else None,
            "replica_rss_bytes_end": server[-1]["replica_rss_bytes"] if server else None,
            "replica_rss_growth_after_warmup_pct": growth("replica_rss_bytes"),
            "gateway_rss_bytes_start": server[0]["gateway_rss_bytes"] if server else None,
            "gateway_rss_bytes_end": server[-1]["gateway_rss_bytes"] if server else None,
            "gateway_rss_growth_after_warmup_pct": growth("gateway_rss_bytes"),
        },
        "timeline": stats.timeline,
        "server_samples": server,
    }


def write_json(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def plot(data: dict[str, Any], path: Path) -> None:
    """Throughput, first-token latency and server memory over the run, from its first second:
    the ramp, the steady part (after a warm-up, memory growth is measured), then sessions closing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = data["timeline"]
    # Constrained layout keeps the two-line title and the legends above the panels inside the
    # figure (tight_layout cut a long title at both edges).
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True, layout="constrained")
    ts = [p["t"] for p in timeline]
    (tokens,) = axes[0].plot(ts, [p["tokens_per_s"] for p in timeline], label="tokens/s")
    axes[0].set_ylabel("tokens/s to clients")
    ax2 = axes[0].twinx()
    (active,) = ax2.plot(
        ts, [p["active_sessions"] for p in timeline], color="grey", label="active sessions"
    )
    ax2.set_ylabel("active sessions")
    ax2.set_ylim(bottom=0)
    # Seconds in which first tokens came: with long first-token latencies they are few and far
    # apart, so each is a marker (a line alone draws nothing between gaps).
    first = [(p["t"], p["ttft_ms_p50"]) for p in timeline if p["ttft_ms_p50"] is not None]
    axes[1].plot(
        [t for t, _ in first], [v for _, v in first], color="tab:orange", marker="o", markersize=3
    )
    axes[1].set_ylabel("first-token latency p50 (ms)")
    if not first:
        axes[1].text(0.5, 0.5, "no first tokens", transform=axes[1].transAxes, ha="center")
    samples = data["server_samples"]
    st = [s["t"] for s in samples]
    axes[2].plot(st, [s["replica_rss_bytes"] / 2**20 for s in samples], label="replicas RSS")
    axes[2].plot(st, [s["gateway_rss_bytes"] / 2**20 for s in samples], label="gateway RSS")
    axes[2].plot(st, [s["kv_bytes"] / 2**20 for s in samples], label="KV arenas")
    axes[2].set_ylabel("MiB")
    axes[2].set_xlabel("seconds since the run started")
    axes[2].legend(loc="lower right", fontsize="small")
    ramp_end, warm_end = data["ramp_s"], data["warm_from_s"]
    steady_end = data["ramp_s"] + data["duration_s"]
    marks = [
        (ramp_end, "tab:green", ":", f"all sessions opened ({ramp_end:.0f} s ramp)"),
        (warm_end, "tab:purple", "--", "warm-up over: memory growth measured from here"),
        (steady_end, "tab:red", "-.", "duration over: sessions close"),
    ]
    lines = []
    for ax in axes:
        for x, color, style, label in marks:
            line = ax.axvline(x, color=color, linestyle=style, linewidth=1, label=label)
            if ax is axes[0]:
                lines.append(line)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    # Above the first panel, not on it: a legend inside covered the throughput curve.
    axes[0].legend(
        handles=[tokens, active, *lines],
        loc="lower left",
        bbox_to_anchor=(0.0, 1.02, 1.0, 0.2),
        mode="expand",
        ncol=2,
        fontsize="small",
        frameon=False,
    )
    axes[2].set_xlim(left=0)
    errors = ", ".join(f"{code} {n}" for code, n in sorted(data["errors"].items())) or "0"
    saturated = "saturated" if data.get("saturated") else "not saturated"
    slots = f" on {data['slots']} slots" if data.get("slots") else ""
    fig.suptitle(
        f"{data['sessions']} sessions{slots} ({saturated}): {data['ramp_s']:.0f} s ramp + "
        f"{data['duration_s']:.0f} s steady, then closing\n"
        f"steady {data['tokens_per_s']:.0f} tokens/s, opened {data['sessions_opened']}, "
        f"refused {data['opens_refused']}, lost {data['sessions_lost']}, errors {errors}"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
