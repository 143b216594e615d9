"""Design B: every replica serves its own grpc.aio server (port base+local_rank);
a thin per-node forwarder deployment (also grpc.aio) routes each bidi stream by
the `session_id` metadata (replica unique id prefix) or, for a new session, to
the replica with the most free slots, and pipes raw bytes both ways (no
protobuf decode in the forwarder).  Tokens go replica -> forwarder -> client
directly over gRPC: no Ray call per message."""
import asyncio
import json
import logging
import random
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from ray import serve

from engine_sim import EngineSim
from sinkproto import session_pb2 as pb
from sinkproto import session_pb2_grpc as pbg

APP_NAME = "sinkproto_b"
SESSION = "/sinkproto.v1.SinkServe/Session"
INFO = "/sinkproto.v1.SinkServe/Info"
logger = logging.getLogger("ray.serve")

SERVER_OPTS = [
    ("grpc.so_reuseport", 0),  # grpc defaults to SO_REUSEPORT=1: a second
    # replica on the same port would silently share it instead of failing
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class _Servicer(pbg.SinkServeServicer):
    def __init__(self, owner):
        self.o = owner

    async def Session(self, request_iterator, context):
        o = self.o
        md = dict(context.invocation_metadata())
        sid = md.get("session_id") or None
        if sid is not None and not sid.startswith(o.rid + "."):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"session {sid} is not on replica {o.rid}")
        sid = o.engine.open(sid, prefix=o.rid + ".")
        if sid is None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free session slots")
        first = True
        try:
            async for msg in request_iterator:
                o.msgs_in += 1
                if msg.max_tokens == -1:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "max_tokens must be >= 0")
                if msg.max_tokens == 0:  # ping: round trip through the path, no engine
                    out = pb.ServerMsg(turn_end=True, seq=msg.seq)
                    if first:
                        out.session_id = sid
                        out.replica = o.rid
                        first = False
                    yield out
                    continue
                q = o.engine.submit(sid, msg.max_tokens)
                while True:
                    toks, end = await q.get()
                    out = pb.ServerMsg(token_ids=toks, turn_end=end, seq=msg.seq)
                    if first:
                        out.session_id = sid
                        out.replica = o.rid
                        first = False
                    o.msgs_out += 1
                    yield out
                    if end:
                        break
        finally:
            o.engine.close(sid)

    async def Info(self, request, context):
        st = self.o.stats()
        return pb.InfoReply(replica=self.o.rid, free_slots=st["free_slots"],
                            sessions=st["sessions"], stats_json=json.dumps(st))


@serve.deployment(num_replicas=2, max_ongoing_requests=100,
                  ray_actor_options={"num_cpus": 0})
class SessionReplicaB:
    async def __init__(self, slots=4096, coalesce=8, step_ms=20, base_port=9200):
        ctx = serve.get_replica_context()
        self.rid = ctx.replica_id.unique_id
        self.engine = EngineSim(step_s=step_ms / 1000, coalesce=coalesce, slots=slots)
        self.engine.start()
        self.msgs_in = self.msgs_out = 0
        self.port = base_port + ctx.rank.local_rank
        self.server = grpc.aio.server(options=SERVER_OPTS)
        pbg.add_SinkServeServicer_to_server(_Servicer(self), self.server)
        hs = health.aio.HealthServicer() if hasattr(health, "aio") else None
        if hs is not None:
            health_pb2_grpc.add_HealthServicer_to_server(hs, self.server)
        bound = self.server.add_insecure_port(f"0.0.0.0:{self.port}")
        if bound == 0:
            raise RuntimeError(f"port {self.port} busy")
        await self.server.start()
        logger.info(f"replica {self.rid} grpc on {self.port}")

    def stats(self):
        st = self.engine.stats()
        st.update(replica=self.rid, port=self.port, msgs_in=self.msgs_in,
                  msgs_out=self.msgs_out)
        return st

    def record_routing_stats(self):
        st = self.engine.stats()
        return {"free_slots": st["free_slots"], "grpc_port": self.port}

    async def __del__(self):
        await self.server.stop(5)


class _Backend:
    def __init__(self, port, nch):
        self.port = port
        self.chans = [grpc.aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(nch)]
        self.calls = [c.stream_stream(SESSION) for c in self.chans]  # bytes in/out
        self.info = self.chans[0].unary_unary(
            INFO, request_serializer=pb.InfoRequest.SerializeToString,
            response_deserializer=pb.InfoReply.FromString)
        self.rid = None
        self.free = 0
        self.local_open = 0
        self.rr = 0

    def call(self):
        self.rr = (self.rr + 1) % len(self.calls)
        return self.calls[self.rr]


@serve.deployment(num_replicas=1, max_ongoing_requests=100,
                  ray_actor_options={"num_cpus": 0})
class Forwarder:
    async def __init__(self, replicas_handle=None, port=9100, base_port=9200, scan=4,
                       channels_per_backend=4):
        self._replicas_handle = replicas_handle
        self.by_port = {p: _Backend(p, channels_per_backend)
                        for p in range(base_port, base_port + scan)}
        self.by_rid = {}
        self.streams = 0
        self.fwd_errors = 0
        self.server = grpc.aio.server(options=SERVER_OPTS)
        self.server.add_generic_rpc_handlers((_FwdHandler(self),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.server.add_insecure_port(f"0.0.0.0:{port}") == 0:
            raise RuntimeError(f"port {port} busy")
        await self.server.start()
        self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self):
        while True:
            for p, b in self.by_port.items():
                try:
                    r = await b.info(pb.InfoRequest(), timeout=1.0)
                    if b.rid != r.replica:
                        if b.rid:
                            self.by_rid.pop(b.rid, None)
                        b.rid = r.replica
                        self.by_rid[r.replica] = b
                    b.free = r.free_slots
                except grpc.aio.AioRpcError:
                    if b.rid:
                        self.by_rid.pop(b.rid, None)
                        b.rid = None
            await self.health.set(
                "", health_pb2.HealthCheckResponse.SERVING if self.by_rid
                else health_pb2.HealthCheckResponse.NOT_SERVING)
            await asyncio.sleep(1.0)

    def pick(self, sid):
        if sid:
            b = self.by_rid.get(sid.split(".", 1)[0])
            return b  # None -> unknown replica (real system: directory / rebuild)
        live = list(self.by_rid.values())
        if not live:
            return None
        random.shuffle(live)
        # fewest open streams through this forwarder, tie-break on reported free
        return min(live, key=lambda b: (b.local_open, -b.free))

    def stats(self):
        return {"streams": self.streams, "fwd_errors": self.fwd_errors,
                "backends": {b.rid: b.local_open for b in self.by_rid.values()}}


class _FwdHandler(grpc.GenericRpcHandler):
    def __init__(self, fwd):
        self.f = fwd
        self._session = grpc.stream_stream_rpc_method_handler(self.session)
        self._info = grpc.unary_unary_rpc_method_handler(self.info)

    def service(self, handler_call_details):
        if handler_call_details.method == SESSION:
            return self._session
        if handler_call_details.method == INFO:
            return self._info
        return None

    async def info(self, request_bytes, context):
        b = self.f.pick(None)
        if b is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no replicas")
        return await b.chans[0].unary_unary(INFO)(request_bytes)

    async def session(self, request_iterator, context):
        f = self.f
        md = tuple((k, v) for k, v in context.invocation_metadata()
                   if k in ("session_id", "request_id"))
        sid = dict(md).get("session_id")
        b = f.pick(sid)
        if b is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE if not sid else grpc.StatusCode.NOT_FOUND,
                "no replica available" if not sid else f"unknown replica for {sid}")
        f.streams += 1
        b.local_open += 1
        call = b.call()(request_iterator, metadata=md)
        try:
            async for resp in call:
                yield resp
        except grpc.aio.AioRpcError as e:
            f.fwd_errors += 1
            await context.abort(e.code(), e.details() or "")
        finally:
            b.local_open -= 1
            f.streams -= 1
            call.cancel()


def build_app(num_replicas=2, slots=4096, coalesce=8, step_ms=20, fwd_port=9100,
              base_port=9200):
    # SessionReplicaB is bound as an argument only so it is deployed in the same
    # app; the Forwarder never calls it through Ray.
    return Forwarder.bind(
        SessionReplicaB.options(num_replicas=num_replicas).bind(
            slots=slots, coalesce=coalesce, step_ms=step_ms, base_port=base_port),
        port=fwd_port, base_port=base_port, scan=max(4, num_replicas))
