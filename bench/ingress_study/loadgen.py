"""grpc.aio load generator: N concurrent endless sessions (ramped), each
send turn -> read until turn_end -> think -> repeat, for D seconds, then
half-close and expect a clean OK.  Writes a JSON summary to --out."""
import argparse
import asyncio
import collections
import json
import random
import resource
import time

import grpc
from sinkproto import session_pb2 as pb
from sinkproto import session_pb2_grpc as pbg


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def main(a):
    targets = a.targets.split(",")
    md = tuple(tuple(kv.split("=", 1)) for kv in a.md.split(",") if kv)
    chans = []
    for t in targets:
        for _ in range(a.channels):
            chans.append(grpc.aio.insecure_channel(t, options=[
                ("grpc.use_local_subchannel_pool", 1),
            ] + ([("grpc.keepalive_time_ms", a.keepalive_ms)] if a.keepalive_ms else [])))
    stubs = [pbg.SinkServeStub(c) for c in chans]

    t_start = time.perf_counter()
    t_steady = t_start + a.ramp
    t_end = t_start + a.ramp + a.duration
    st = collections.Counter()
    errors = collections.Counter()
    ttft, ttft_all, turn_lat = [], [], []
    progress = {}  # stream idx -> last progress time
    replicas = collections.Counter()
    steady_msgs = [0]
    cancelling = [False]
    err_times = []

    async def worker(i):
        await asyncio.sleep(a.ramp * i / a.n)
        stub = stubs[i % len(stubs)]
        call = stub.Session(metadata=md)
        opened = False
        seq = 0
        try:
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                await call.write(pb.ClientMsg(seq=seq, max_tokens=a.tokens, text="x"))
                st["sent"] += 1
                first = None
                ntok = 0
                while True:
                    m = await call.read()
                    if m is grpc.aio.EOF:
                        raise EOFError
                    now = time.perf_counter()
                    st["recv"] += 1
                    if now >= t_steady:
                        steady_msgs[0] += 1
                    if first is None:
                        first = now - t0
                        ttft_all.append(first)
                        if t0 >= t_steady:
                            ttft.append(first)
                    if m.replica:
                        replicas[m.replica] += 1
                    ntok += len(m.token_ids)
                    if m.turn_end:
                        break
                if t0 >= t_steady:
                    turn_lat.append(now - t0)
                    steady_msgs[0] += 1  # the client message of this turn
                st["tokens"] += ntok
                if ntok != a.tokens:
                    st["bad_token_count"] += 1
                if not opened:
                    opened = True
                    st["opened"] += 1
                seq += 1
                st["turns"] += 1
                progress[i] = now
                think = random.uniform(a.think_min, a.think_max)
                await asyncio.sleep(min(think, max(0.0, t_end - time.perf_counter())))
            await call.done_writing()
            while (await call.read()) is not grpc.aio.EOF:
                pass
            code = await call.code()
            if code == grpc.StatusCode.OK:
                st["closed_ok"] += 1
            else:
                errors[code.name] += 1
                st["lost"] += 1
        except grpc.aio.AioRpcError as e:
            if cancelling[0] and e.code() == grpc.StatusCode.CANCELLED:
                st["stuck_cancelled"] += 1   # we cancelled it after the grace period
                st["stuck_never_opened" if not opened else "stuck_mid_turn"] += 1
                return
            errors[e.code().name] += 1
            if len(err_times) < 2000:
                err_times.append((round(time.perf_counter() - t_start, 1), e.code().name, i, opened))
            if e.code() != grpc.StatusCode.OK:
                errors["detail:" + (e.details() or "")[:100]] += 1
            st["lost" if opened else "open_failed"] += 1
        except EOFError:
            errors["EOF_mid_turn"] += 1
            st["lost" if opened else "open_failed"] += 1
        except asyncio.CancelledError:
            st["stuck_cancelled"] += 1
            call.cancel()
            raise

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    tasks = [asyncio.ensure_future(worker(i)) for i in range(a.n)]
    marks = {}
    # sample counters at steady start/end for rates
    await asyncio.sleep(max(0, t_steady - time.perf_counter()))
    marks["steady0"] = (time.perf_counter(), dict(st))
    await asyncio.sleep(max(0, t_end - time.perf_counter()))
    marks["steady1"] = (time.perf_counter(), dict(st))
    done, pending = await asyncio.wait(tasks, timeout=a.grace)
    cancelling[0] = True
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    (ts0, c0), (ts1, c1) = marks["steady0"], marks["steady1"]
    dt = ts1 - ts0
    res = {
        "n": a.n, "ramp_s": a.ramp, "duration_s": a.duration,
        "targets": targets, "channels": len(chans),
        "opened_ok": st["opened"], "closed_ok": st["closed_ok"],
        "lost": st["lost"], "open_failed": st["open_failed"],
        "stuck_cancelled": st["stuck_cancelled"],
        "stuck_never_opened": st["stuck_never_opened"], "stuck_mid_turn": st["stuck_mid_turn"],
        "errors": dict(errors),
        "error_times(t,code,stream,opened)": err_times[:50],
        "error_t_range": [min(e[0] for e in err_times), max(e[0] for e in err_times)] if err_times else None,
        "bad_token_count": st["bad_token_count"],
        "turns_total": st["turns"],
        "steady_turns_per_s": round((c1.get("turns", 0) - c0.get("turns", 0)) / dt, 1),
        "steady_msgs_per_s(client+server)": round(
            ((c1.get("sent", 0) - c0.get("sent", 0)) + (c1.get("recv", 0) - c0.get("recv", 0))) / dt, 1),
        "steady_server_msgs_per_s": round((c1.get("recv", 0) - c0.get("recv", 0)) / dt, 1),
        "steady_tokens_per_s": round((c1.get("tokens", 0) - c0.get("tokens", 0)) / dt, 1),
        "ttft_ms_p50": round(1000 * (pct(ttft, 50) or 0), 1),
        "ttft_ms_p99": round(1000 * (pct(ttft, 99) or 0), 1),
        "ttft_ms_max": round(1000 * (max(ttft) if ttft else 0), 1),
        "ttft_ms_p50_incl_ramp": round(1000 * (pct(ttft_all, 50) or 0), 1),
        "ttft_ms_p99_incl_ramp": round(1000 * (pct(ttft_all, 99) or 0), 1),
        "turn_ms_p50": round(1000 * (pct(turn_lat, 50) or 0), 1),
        "turn_ms_p99": round(1000 * (pct(turn_lat, 99) or 0), 1),
        "ttft_samples": len(ttft),
        "sessions_per_replica": dict(replicas),
        "loadgen_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 1),
        "loadgen_maxrss_mb": round(ru1.ru_maxrss / 1024, 1),
    }
    for c in chans:
        await c.close()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--targets", required=True)
    p.add_argument("--md", default="")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--ramp", type=float, default=10)
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--think-min", type=float, default=0.5)
    p.add_argument("--think-max", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--grace", type=float, default=20)
    p.add_argument("--out", default="/tmp/loadgen.json")
    p.add_argument("--keepalive-ms", type=int, default=30000)
    asyncio.run(main(p.parse_args()))
