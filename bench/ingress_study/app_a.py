"""Design A: Ray Serve's own gRPC proxy, bidi stream into a deployment method
taking gRPCInputStream, session-affinity RequestRouter on RequestMetadata.session_id.

Client metadata: ("application", APP_NAME) [required by the proxy], and for a
resumed session ("session_id", "<replica_unique_id>.<hex>").  A stream without
session_id is a new session: the router places it on the least-loaded replica
(fewest ongoing requests == open streams), the replica mints the id and sends it
back in the first ServerMsg.
"""
import json
import logging
import random
from typing import List, Optional

import grpc
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream
from ray.serve.request_router import PendingRequest, RunningReplica

from engine_sim import EngineSim
from sinkproto.session_pb2 import InfoReply, ServerMsg

APP_NAME = "sinkproto"
logger = logging.getLogger("ray.serve")


class SessionAffinityRouter(ConsistentHashRouter):
    """session_id "<rid>.<x>" -> exactly that replica (strict, no fallback);
    no session_id -> least-loaded replica (one rank with all candidates, the base
    class picks the lowest queue length = fewest open streams);
    unknown rid (replica gone) -> consistent hash over the live ring (the real
    system would consult a directory / re-prefill; out of scope here)."""

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
            sid = pending_request.metadata.session_id
            if not sid:
                # one rank with all replicas: the base class probes / uses cached
                # queue lengths and takes the lowest (= fewest open streams).
                # Shuffle so ties do not always pick the first replica.
                c = list(candidate_replicas)
                random.shuffle(c)
                return [c]
            rid = sid.split(".", 1)[0]
            for r in candidate_replicas:
                if r.replica_id.unique_id == rid:
                    return [[r]]
        return await super().choose_replicas(candidate_replicas, pending_request)


@serve.deployment(
    num_replicas=2,
    max_ongoing_requests=5000,  # every open stream holds one of these
    ray_actor_options={"num_cpus": 0},
    request_router_config=RequestRouterConfig(
        request_router_class=SessionAffinityRouter,
        request_router_kwargs={"num_fallback_replicas": 0},
        request_routing_stats_period_s=2.0,
    ),
)
class SessionReplicaA:
    def __init__(self, slots: int = 4096, coalesce: int = 8, step_ms: float = 20):
        self.rid = serve.get_replica_context().replica_id.unique_id
        self.engine = EngineSim(step_s=step_ms / 1000, coalesce=coalesce, slots=slots)
        self.msgs_in = 0
        self.msgs_out = 0

    # Method name == gRPC method name. First positional arg is the input stream;
    # a kwarg named exactly `grpc_context` receives the RayServegRPCContext.
    async def Session(
        self, request_stream: gRPCInputStream, grpc_context: RayServegRPCContext
    ):
        self.engine.start()
        md = dict(grpc_context.invocation_metadata())
        sid = md.get("session_id") or None
        if sid is not None and not sid.startswith(self.rid + "."):
            grpc_context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            grpc_context.set_details(f"session {sid} is not on replica {self.rid}")
            raise RuntimeError("misrouted session")
        sid = self.engine.open(sid, prefix=self.rid + ".")
        if sid is None:
            grpc_context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            grpc_context.set_details("no free session slots")
            raise RuntimeError("no free slots")
        first = True
        try:
            async for msg in request_stream:
                self.msgs_in += 1
                if msg.max_tokens == -1:  # test hook: user error with a status code
                    grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                    grpc_context.set_details("max_tokens must be >= 0")
                    raise ValueError("bad max_tokens")
                if msg.max_tokens == 0:  # ping: round trip through the path, no engine
                    out = ServerMsg(turn_end=True, seq=msg.seq)
                    if first:
                        out.session_id = sid
                        out.replica = self.rid
                        first = False
                    yield out
                    continue
                if msg.max_tokens == -2:  # test hook: set a code and just return
                    grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                    grpc_context.set_details("set_code then return, no raise")
                    return
                q = self.engine.submit(sid, msg.max_tokens)
                while True:
                    toks, end = await q.get()
                    out = ServerMsg(token_ids=toks, turn_end=end, seq=msg.seq)
                    if first:
                        out.session_id = sid
                        out.replica = self.rid
                        first = False
                    self.msgs_out += 1
                    yield out
                    if end:
                        break
        finally:
            self.engine.close(sid)

    async def Info(self, request, grpc_context: RayServegRPCContext = None):
        st = self.stats()
        return InfoReply(
            replica=self.rid,
            free_slots=st["free_slots"],
            sessions=st["sessions"],
            stats_json=json.dumps(st),
        )

    def stats(self):
        st = self.engine.stats()
        st.update(replica=self.rid, msgs_in=self.msgs_in, msgs_out=self.msgs_out)
        return st

    # Pushed to routers via the controller every request_routing_stats_period_s
    # (visible as RunningReplica.routing_stats).
    def record_routing_stats(self):
        st = self.engine.stats()
        return {"free_slots": st["free_slots"], "sessions": st["sessions"]}


def build(args=None):
    return SessionReplicaA.bind()


app = SessionReplicaA.bind()
