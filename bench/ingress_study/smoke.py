"""Functional smoke test: python smoke.py A|B
new session -> 2 turns; resume by session_id lands on same replica; user status
code propagation; Info unary; Serve Healthz / grpc.health / reflection probes."""
import asyncio
import sys
import time

import cluster  # sets sys.path / PYTHONPATH
import grpc
from sinkproto import session_pb2 as pb
from sinkproto import session_pb2_grpc as pbg


async def one_session(target, md, turns=2, max_tokens=32):
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pbg.SinkServeStub(ch)
        call = stub.Session(metadata=md)
        sid = rep = None
        out = []
        for t in range(turns):
            t0 = time.perf_counter()
            await call.write(pb.ClientMsg(seq=t, max_tokens=max_tokens, text="hi"))
            n = 0
            msgs = 0
            ttft = None
            while True:
                m = await call.read()
                if m is grpc.aio.EOF:
                    raise RuntimeError("EOF mid turn")
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if m.session_id:
                    sid, rep = m.session_id, m.replica
                n += len(m.token_ids)
                msgs += 1
                if m.turn_end:
                    break
            out.append((t, n, msgs, round(ttft * 1000, 1),
                        round((time.perf_counter() - t0) * 1000, 1)))
        await call.done_writing()
        rest = []
        while True:
            m = await call.read()
            if m is grpc.aio.EOF:
                break
            rest.append(m)
        code = await call.code()
        return sid, rep, out, code, rest


async def expect_error(target, md, max_tokens):
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pbg.SinkServeStub(ch)
        call = stub.Session(metadata=md)
        await call.write(pb.ClientMsg(seq=0, max_tokens=max_tokens))
        await call.done_writing()
        try:
            while (await call.read()) is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()[:200], e.trailing_metadata()
        return await call.code(), await call.details(), None


async def main(design):
    if design == "A":
        target = f"127.0.0.1:{cluster.GRPC_PORT_A}"
        base_md = (("application", "sinkproto"),)
    else:
        target = f"127.0.0.1:{cluster.FWD_PORT_B}"
        base_md = ()
    sid, rep, out, code, rest = await one_session(target, base_md)
    print("new session:", sid, "replica", rep, "turns", out, "final", code, rest)
    reps = set()
    for _ in range(4):
        s2, r2, out2, code2, _ = await one_session(
            target, base_md + (("session_id", sid),), turns=1)
        reps.add(r2)
        print("resume:", s2, r2, out2, code2)
    print("resume replicas seen:", reps, "expected", rep)
    # new sessions spread
    seen = []
    for _ in range(6):
        s3, r3, *_ = await one_session(target, base_md, turns=1)
        seen.append(r3)
    print("new-session replicas:", seen)
    print("user error:", await expect_error(target, base_md, -1))
    if design == "A":
        print("set_code + return (no raise):", await expect_error(target, base_md, -2))
    print("misrouted/unknown sid:",
          await expect_error(target, base_md + (("session_id", "zzzz.1"),), 4))
    if design == "A":
        print("no application md:", await expect_error(target, (), 4))
    async with grpc.aio.insecure_channel(target) as ch:
        try:
            r = await pbg.SinkServeStub(ch).Info(pb.InfoRequest(), metadata=base_md)
            print("Info:", r.replica, r.free_slots, r.sessions)
        except grpc.aio.AioRpcError as e:
            print("Info error", e.code(), e.details())
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            print("grpc.health.v1 Check:", r.status)
        except grpc.aio.AioRpcError as e:
            print("grpc.health.v1 Check error:", e.code(), e.details()[:120])
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        try:
            st = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def reqs():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
            async for r in st.ServerReflectionInfo(reqs()):
                print("reflection services:", [s.name for s in r.list_services_response.service])
        except grpc.aio.AioRpcError as e:
            print("reflection error:", e.code(), e.details()[:120])
        if design == "A":
            from ray.serve.generated import serve_pb2, serve_pb2_grpc
            r = await serve_pb2_grpc.RayServeAPIServiceStub(ch).Healthz(serve_pb2.HealthzRequest())
            print("Serve Healthz:", r.message)


if __name__ == "__main__":
    design = sys.argv[1]
    cluster.ray_stop()
    info = cluster.start(design)
    print("startup", info)
    try:
        asyncio.run(main(design))
    finally:
        cluster.shutdown()
