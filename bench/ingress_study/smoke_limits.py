"""Design A limits: (1) max_ongoing_requests counts open streams, extra streams
queue (never error) until a slot frees, max_queued_requests overflow ->
RESOURCE_EXHAUSTED; (2) client keepalive pings vs the proxy's default gRPC ping
policy on an idle stream."""
import asyncio
import sys
import time

import cluster
import grpc
from ray import serve
from sinkproto import session_pb2 as pb
from sinkproto import session_pb2_grpc as pbg

MD = (("application", "sinkproto"),)


async def turn(call, seq, tokens=4):
    await call.write(pb.ClientMsg(seq=seq, max_tokens=tokens))
    while True:
        m = await call.read()
        if m is grpc.aio.EOF:
            raise EOFError
        if m.turn_end:
            return m


async def limits():
    ch = grpc.aio.insecure_channel("127.0.0.1:9000")
    stub = pbg.SinkServeStub(ch)
    calls = [stub.Session(metadata=MD) for _ in range(4)]
    tasks = []
    for c in calls:
        tasks.append(asyncio.ensure_future(turn(c, 0)))
        await asyncio.sleep(0.5)
    await asyncio.wait(tasks, timeout=5)
    res = []
    for i, (c, t) in enumerate(zip(calls, tasks)):
        if not t.done():
            res.append((i, "no reply within 5 s (queued in the proxy's router)"))
        elif t.exception() is None:
            res.append((i, "served"))
        else:
            res.append((i, (await c.code()).name, (await c.details())[:120]))
    print("max_ongoing_requests=2, max_queued_requests=%s, 4 streams:" % sys.argv[1], res)
    # close stream 0 -> the queued one should now be served
    await calls[0].done_writing()
    while (await calls[0].read()) is not grpc.aio.EOF:
        pass
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.shield(tasks[2]), 10)
        print("after closing stream 0, queued stream 2 got its reply after",
              round(time.perf_counter() - t0, 2), "s")
    except Exception as e:
        print("queued stream 2 still not served:", repr(e)[:200])
    for c in calls:
        c.cancel()
    await ch.close()


async def keepalive(ka_ms, idle_s):
    ch = grpc.aio.insecure_channel("127.0.0.1:9000", options=[
        ("grpc.keepalive_time_ms", ka_ms), ("grpc.keepalive_timeout_ms", 5000)])
    stub = pbg.SinkServeStub(ch)
    call = stub.Session(metadata=MD)
    await turn(call, 0)
    await asyncio.sleep(idle_s)
    try:
        await turn(call, 1)
        print(f"keepalive {ka_ms} ms, idle {idle_s} s: stream still OK")
    except grpc.aio.AioRpcError as e:
        print(f"keepalive {ka_ms} ms, idle {idle_s} s: {e.code().name} {e.details()[:150]}")
    call.cancel()
    await ch.close()


async def main():
    await limits()
    if len(sys.argv) > 2:
        await keepalive(10000, 35)


if __name__ == "__main__":
    import sys
    cluster.start("A", num_replicas=1)
    from app_a import APP_NAME, SessionReplicaA
    serve.run(SessionReplicaA.options(num_replicas=1, max_ongoing_requests=2,
                                      max_queued_requests=int(sys.argv[1])).bind(),
              name=APP_NAME, route_prefix="/")
    try:
        asyncio.run(main())
    finally:
        cluster.shutdown()
