"""One bounded benchmark run:
  python run_bench.py --design A|B|Bdirect|C --n 1000 --ramp 15 --duration 30
Waits for the shared box to be quiet, starts a fresh local Ray (ray.init), deploys, runs loadgen.py as a
subprocess, samples CPU/RSS of every Ray/Serve/loadgen process with psutil, tears
everything down.  Result JSON -> results/<design>_<n>.json"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

import cluster
import psutil

HERE = cluster.HERE


def label(p):
    try:
        cmd = p.cmdline()
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    s = " ".join(cmd)
    if "loadgen.py" in s:
        return "loadgen"
    if s.startswith("ray::"):
        t = cmd[0]
        if "ProxyActor" in t:
            return "proxy"
        if "ServeController" in t:
            return "controller"
        if "SessionReplica" in t:
            return "replica"
        if "Forwarder" in t:
            return "forwarder"
        return "ray_other_worker"
    if name in ("raylet", "gcs_server") or "raylet" in s or "gcs_server" in s:
        return "ray_core"
    if "ray/" in s and "python" in name:
        return "ray_core"
    if p.pid == os.getpid():
        return "driver"
    return None


def snapshot():
    out = {}
    for p in psutil.process_iter():
        lab = label(p)
        if lab is None:
            continue
        try:
            ct = p.cpu_times()
            out[p.pid] = (lab, ct.user + ct.system, p.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def agg_rss(snap):
    r = {}
    for lab, _, rss in snap.values():
        r.setdefault(lab, []).append(round(rss / 2**20, 1))
    return r


def cpu_delta(s0, s1, dt):
    d = {}
    for pid, (lab, c1, _) in s1.items():
        c0 = s0.get(pid, (lab, 0.0, 0))[1]
        d[lab] = d.get(lab, 0.0) + (c1 - c0)
    return {k: round(100 * v / dt, 1) for k, v in sorted(d.items())}  # % of one core


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--design", required=True, choices=["A", "B", "Bdirect", "C"])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--ramp", type=float, default=15)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--coalesce", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--think-min", type=float, default=0.5)
    ap.add_argument("--think-max", type=float, default=1.0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--keepalive-ms", type=int, default=30000)
    a = ap.parse_args()

    os.makedirs(f"{HERE}/results", exist_ok=True)
    name = f"{a.design}_{a.n}{a.tag}"
    cluster.ray_stop()
    # the box is shared with other work: wait (max 180 s) for it to be quiet
    t_w = time.time()
    pre_busy = psutil.cpu_percent(interval=5)
    while pre_busy > 15 and time.time() - t_w < 180:
        pre_busy = psutil.cpu_percent(interval=5)
    print("pre-run machine busy %", pre_busy, "waited", round(time.time() - t_w))
    info = cluster.start({"A": "A", "C": "C"}.get(a.design, "B"), coalesce=a.coalesce)
    time.sleep(3)
    if a.design == "A":
        targets = f"127.0.0.1:{cluster.GRPC_PORT_A}"
        md = "application=sinkproto"
    elif a.design == "B":
        targets = f"127.0.0.1:{cluster.FWD_PORT_B}"
        md = ""
    elif a.design == "C":  # Ray direct ingress: replica gRPC ports 40000/40001
        targets = "127.0.0.1:40000,127.0.0.1:40001"
        md = "application=sinkproto"
    else:  # client connects straight to the replica ports (no ingress hop)
        targets = f"127.0.0.1:{cluster.REPLICA_BASE_PORT_B},127.0.0.1:{cluster.REPLICA_BASE_PORT_B + 1}"
        md = ""
    out_json = f"{HERE}/results/{name}.loadgen.json"
    cmd = [sys.executable, f"{HERE}/loadgen.py", "--targets", targets, "--md", md,
           "--n", str(a.n), "--ramp", str(a.ramp), "--duration", str(a.duration),
           "--channels", str(a.channels), "--tokens", str(a.tokens),
           "--think-min", str(a.think_min), "--think-max", str(a.think_max),
           "--keepalive-ms", str(a.keepalive_ms), "--out", out_json]
    s_idle = snapshot()
    sys_idle = psutil.cpu_times()
    t0 = time.time()
    lg = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    series = []
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            s = snapshot()
            series.append((round(time.time() - t0, 1), agg_rss(s)))
            stop.wait(5)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    time.sleep(a.ramp + 1)
    s_st0, sys0, ts0 = snapshot(), psutil.cpu_times(), time.time()
    time.sleep(max(0, a.duration - 2))
    s_st1, sys1, ts1 = snapshot(), psutil.cpu_times(), time.time()
    try:
        lg_out, _ = lg.communicate(timeout=a.grace_total if hasattr(a, "grace_total") else 90)
    except subprocess.TimeoutExpired:
        lg.kill()
        lg_out, _ = lg.communicate()
    stop.set()
    th.join()

    def busy(c0, c1):
        tot = sum(c1) - sum(c0)
        idle = (c1.idle + c1.iowait) - (c0.idle + c0.iowait)
        return round(100 * (tot - idle) / tot, 1)

    try:
        lgres = json.load(open(out_json))
    except Exception:
        lgres = {"error": "no loadgen json", "tail": lg_out[-3000:]}
    res = {
        "design": a.design, "n": a.n, "startup": info, "pre_run_busy_pct": pre_busy,
        "loadgen": lgres,
        "cpu_pct_of_one_core_steady": cpu_delta(s_st0, s_st1, ts1 - ts0),
        "machine_busy_pct_steady(2 cores)": busy(sys0, sys1),
        "unlabeled_cpu_pct_of_one_core_steady": round(
            2 * busy(sys0, sys1) - sum(cpu_delta(s_st0, s_st1, ts1 - ts0).values()), 1),
        "loadavg_end": os.getloadavg(),
        "rss_mb_idle": agg_rss(s_idle),
        "rss_mb_steady_start": agg_rss(s_st0),
        "rss_mb_steady_end": agg_rss(s_st1),
        "rss_series": series,
        "loadgen_tail": lg_out[-1500:],
    }
    # replica-side stats (engine step lag etc.)
    try:
        import grpc
        from sinkproto import session_pb2 as pb
        from sinkproto import session_pb2_grpc as pbg
        reps = {}
        if a.design in ("A", "C"):
            # unary through the proxy goes to some replica; ask several times
            ch = grpc.insecure_channel(targets)
            stub = pbg.SinkServeStub(ch)
            for _ in range(10):
                r = stub.Info(pb.InfoRequest(), metadata=(("application", "sinkproto"),),
                              timeout=10)
                reps[r.replica] = json.loads(r.stats_json)
        else:
            for port in (cluster.REPLICA_BASE_PORT_B, cluster.REPLICA_BASE_PORT_B + 1):
                ch = grpc.insecure_channel(f"127.0.0.1:{port}")
                r = pbg.SinkServeStub(ch).Info(pb.InfoRequest(), timeout=10)
                reps[r.replica] = json.loads(r.stats_json)
        res["replica_stats"] = reps
    except Exception as e:
        res["replica_stats_error"] = repr(e)[:300]
    with open(f"{HERE}/results/{name}.json", "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k not in ("rss_series", "loadgen_tail")},
                     indent=1))
    t_sd = time.time()
    cluster.shutdown()
    cluster.ray_stop()
    print("shutdown_s", round(time.time() - t_sd, 1))


if __name__ == "__main__":
    main()
