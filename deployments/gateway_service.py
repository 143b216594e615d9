"""The gateway's gRPC service: routes session streams to replicas and pipes them as raw bytes.

It reads only the first message of a Session stream: Resume names the session, whose id begins
with the id of the replica that holds it; Open goes to the replica with the most free slots (a
replica that turns out to be full passes the Open on to the next). After that the stream is piped
as raw bytes both ways. It also answers Stats (by asking every replica), the standard
grpc.health.v1 health service, and server reflection. No Ray here: the Serve deployment
(deployments/gateway.py) feeds it replicas from the directory, the Ray-free launcher
(deployments/standalone.py) from fixed addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deployments.auth import ANONYMOUS
from deployments.gateway_guard import GatewayGuard
from deployments.store import SessionStore, StoreUnavailableError
from sinkwire.options import server_options
from sinkwire.session_ids import replica_of
from sinkwire.status import StreamError, retry_after_s
from sinkwire.v1 import streaming_llm_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "sinkserve.v1.StreamingLLM"
SESSION_METHOD = f"/{SERVICE}/Session"
STATS_METHOD = f"/{SERVICE}/Stats"
# A replica unheard of this long is taken out of routing (its channels closed, its streams ended).
# Shorter gaps (a long engine step, a slow poll) must not cost sessions their streams.
REPLICA_STALE_AFTER_S = 5.0
STORE_TIMEOUT_S = 2.0  # a session-store lookup that takes longer routes by the session id alone
# A replica that left routing this recently may come back (a frozen process, a network split): a
# Resume for one of its sessions is UNAVAILABLE (try again), not NOT_FOUND.
REMEMBER_GONE_S = 600.0
# With no replica taking sessions, a stream waits this long for one before it is refused: a
# gateway reads the directory every 0.5 s, so one that has just started (its sibling behind the
# same port already serving) or a replica being replaced is a moment, not an error.
WAIT_FOR_REPLICA_S = 5.0
CHANNELS_PER_REPLICA = 4  # HTTP/2 connections to each replica (spreads streams over them)
# Each stream's flow-control window towards a replica, fixed (no BDP growth): when a client stops
# taking a stream's replies, the replica is held back after this much, and its backpressure
# (deployments/backpressure.py) stops the session's decoding. A token message is ~25 bytes.
INTERNAL_WINDOW = [("grpc.http2.lookahead_bytes", 16 * 1024), ("grpc.http2.bdp_probe", 0)]


@dataclass
class Backend:
    """One replica as the gateway sees it."""

    replica_id: str
    address: str
    slots_free: int = 0
    held: int = 0  # sessions it holds, with a slot or offloaded
    accepting: bool = True  # takes new and resumed sessions (not draining, engine alive)
    placed: int = 0  # new sessions sent here since the last directory update
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    _next: int = 0

    def connect(self, max_message_bytes: int = 4 * 1024 * 1024) -> None:
        options = [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_send_message_length", max_message_bytes),
            *INTERNAL_WINDOW,
        ]
        self.channels = [
            grpc.aio.insecure_channel(self.address, options=options)
            for _ in range(CHANNELS_PER_REPLICA)
        ]

    def channel(self) -> grpc.aio.Channel:
        self._next = (self._next + 1) % len(self.channels)
        return self.channels[self._next]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class _Refused(Exception):
    """The replica refused the stream before answering it (full, draining, its engine gone):
    nothing was created there, and the next replica may take it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _ReplicaGone(Exception):
    """The replica was dropped from routing while a stream to it was open."""


class GatewayService:
    """Routing state and the gRPC handlers; `update(infos)` tells it which replicas exist."""

    def __init__(
        self, store: SessionStore | None = None, guard: GatewayGuard | None = None
    ) -> None:
        self.backends: dict[str, Backend] = {}
        self.health = health.aio.HealthServicer()
        # Keys, first-message checks, quotas and error wording (deployments/gateway_guard.py).
        self.guard = guard or GatewayGuard()
        # Where sessions are checkpointed: a Resume goes to the replica holding the session now,
        # or, when its replica is gone, to one with room, which rebuilds it from there.
        self.store = store
        self._gone: dict[str, float] = {}  # replica id -> when it left routing (monotonic)

    async def start(
        self,
        host: str,
        port: int,
        reuse_port: bool = False,
        credentials: grpc.ServerCredentials | None = None,
    ) -> grpc.aio.Server:
        """Listen on host:port (TLS with `credentials`); `reuse_port` lets several gateway
        processes share the port (the kernel spreads connections over them)."""
        server = grpc.aio.server(options=server_options(reuse_port, self.guard.max_message_bytes))
        handlers = {
            "Session": grpc.stream_stream_rpc_method_handler(self.session),
            "Stats": grpc.unary_unary_rpc_method_handler(
                self.stats,
                request_deserializer=pb.StatsRequest.FromString,
                response_serializer=pb.StatsResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{host}:{port}"
        bound = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
        if bound == 0:
            raise RuntimeError(f"cannot listen on {address}")
        await server.start()
        await self._set_serving(False)
        return server

    # -- replicas --------------------------------------------------------------------------------
    async def update(self, infos: list[dict]) -> None:
        """The replicas that exist now: [{replica_id, address, slots_free, accepting}, ...]."""
        seen = set()
        for info in infos:
            replica_id = info["replica_id"]
            seen.add(replica_id)
            backend = self.backends.get(replica_id)
            if backend is None or backend.address != info["address"]:
                if backend is not None:
                    await backend.close()
                backend = Backend(replica_id, info["address"])
                backend.connect(self.guard.max_message_bytes)
                self.backends[replica_id] = backend
            backend.slots_free = info["slots_free"]
            backend.held = info.get("held", 0)
            backend.accepting = info.get("accepting", True)
            backend.placed = 0
        self.guard.quotas.replicas_report(info.get("owners", {}) for info in infos)
        now = time.monotonic()
        for replica_id in set(self.backends) - seen:
            await self.backends.pop(replica_id).close()
            self._gone[replica_id] = now
        for replica_id, since in list(self._gone.items()):
            if now - since > REMEMBER_GONE_S or replica_id in self.backends:
                del self._gone[replica_id]
        await self._set_serving(bool(self.backends))

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def _candidates(self, first: pb.ClientMessage) -> list[Backend]:
        """Backends to try for this stream, best first."""
        if first.WhichOneof("kind") == "resume":
            return await self._resume_candidates(first.resume.session_id)
        backends = await self._room()
        if not backends:
            raise StreamError(grpc.StatusCode.UNAVAILABLE, "no session replica is ready yet")
        return backends

    async def _resume_candidates(self, session_id: str) -> list[Backend]:
        """The replica that holds the session now; if it has none (its replica is gone, or it was
        offloaded and handed back), any replica with room, which rebuilds it from the store."""
        opener = self.backends.get(replica_of(session_id))
        record = None
        store_answered = False  # only the store may say that a session is gone for good
        if self.store is not None:
            try:
                record = await asyncio.wait_for(self.store.get(session_id), STORE_TIMEOUT_S)
                store_answered = True
            except (StoreUnavailableError, TimeoutError):
                log.warning("session store unavailable; routing %s by its id", session_id)
        if record is not None:
            # Its holder first, even one that takes no new sessions: a draining holder hands the
            # session off (its newest state into the store) before it refuses. When the holder
            # refuses before answering (draining, its engine gone, no room to rebuild it), the
            # next replica claims the session and rebuilds it from that state.
            holder = self.backends.get(record.replica_id)
            rebuilders = [b for b in await self._room(holder) if b is not holder]
            candidates = ([holder] if holder is not None else []) + rebuilders
            if not candidates:
                raise StreamError(grpc.StatusCode.UNAVAILABLE, "no session replica is ready yet")
            return candidates
        if opener is None:
            if replica_of(session_id) in self._gone:  # it may come back: try again later
                raise StreamError(
                    grpc.StatusCode.UNAVAILABLE, "the session's replica is unreachable; try again"
                )
            if self.store is not None and not store_answered:  # a restarted gateway knows no
                raise StreamError(  # gone replica: the store's silence is not its answer
                    grpc.StatusCode.UNAVAILABLE, "the session store is unavailable; try again"
                )
            raise StreamError(grpc.StatusCode.NOT_FOUND, f"session {session_id} not found")
        return [opener]

    async def _room(self, holder: Backend | None = None) -> list[Backend]:
        """`_by_room()`, waiting up to WAIT_FOR_REPLICA_S while it is empty, unless there is a
        `holder` to ask first."""
        deadline = time.monotonic() + WAIT_FOR_REPLICA_S
        backends = self._by_room()
        while not backends and holder is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            backends = self._by_room()
        return backends

    def _by_room(self) -> list[Backend]:
        """Replicas taking sessions: the most free slots first, then the fewest sessions held
        (when every slot is taken, idle sessions leave the GPU: spread what is held evenly)."""
        backends = [b for b in self.backends.values() if b.accepting]
        random.shuffle(backends)
        return sorted(backends, key=lambda b: (b.placed - b.slots_free, b.held + b.placed))

    # -- Session ---------------------------------------------------------------------------------
    async def session(self, request_iterator, context) -> AsyncIterator[bytes]:
        guard = self.guard
        requests = aiter(request_iterator)
        raw_first = await anext(requests, None)  # first: a client whose write raced a refusal
        if raw_first is None:  # would be told INTERNAL by its gRPC library
            return
        try:
            principal = await guard.authenticate(context)
            first = guard.first_message(raw_first, principal)
            candidates = await self._candidates(first)
        except StreamError as error:
            await context.abort(error.code, error.message)
        pacing = guard.pacing(principal)  # a key with a tokens_per_s quota
        if pacing is not None:
            requests = pacing.client_messages(requests)
        metadata = guard.replica_metadata(principal)
        opening = first.WhichOneof("kind") == "open"
        refusals: list[_Refused] = []
        for backend in candidates:
            if opening:
                backend.placed += 1
            try:
                pipe = self._pipe(backend, raw_first, requests, context, metadata)
                async for response in pipe if pacing is None else pacing.replies(pipe):
                    yield response
                return
            except _Refused as refused:
                refusals.append(refused)
                continue  # nothing was created there: another replica may take it
            except StreamError as error:  # over a quota while piping
                await context.abort(error.code, error.message)
            except grpc.aio.AioRpcError as error:
                await context.abort(*guard.client_status(error, backend.replica_id))
            except _ReplicaGone:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the session's replica {backend.replica_id} is unreachable; resume the "
                    "session (with a session store it continues from its last checkpoint)",
                )
        if refusals and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refusals):
            message = "no free session slot on any replica"
            hints = [h for r in refusals if (h := retry_after_s(r.details)) is not None]
            if hints:  # the soonest any replica expects a slot
                message += f": every slot is in a conversation; retry in {min(hints):.0f} s"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        last = refusals[-1] if refusals else None
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"no replica could take the stream{f': {last.details}' if last else ''}",
        )

    async def _pipe(
        self, backend: Backend, raw_first: bytes, requests, context, metadata=()
    ) -> AsyncIterator[bytes]:
        """Relay one stream to `backend`. Client messages after the first wait until the replica
        has answered it, so a refused Open can go on to the next replica with nothing lost."""
        opened = asyncio.Event()
        feeding: list[asyncio.Task] = []  # the task gRPC feeds the call from (see finally)

        async def upstream() -> AsyncIterator[bytes]:
            feeding.append(asyncio.current_task())
            yield raw_first
            await opened.wait()
            async for raw in requests:
                yield raw

        call = backend.channel().stream_stream(SESSION_METHOD)(upstream(), metadata=metadata)
        try:
            first_response = True
            async for response in call:
                if first_response:
                    first_response = False
                    opened.set()
                yield response
        except grpc.aio.AioRpcError as error:
            if first_response and self.guard.moves_on(error):
                raise _Refused(*self.guard.client_status(error, backend.replica_id)) from None
            raise
        except asyncio.CancelledError:
            # Not our cancellation (the client leaving): the replica's channel was closed under
            # the call, because the replica was dropped. Say so, or the client waits forever.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise _ReplicaGone() from None
        finally:
            call.cancel()
            # A call that ended on its own is not cancelled, and gRPC leaves its feeding task
            # waiting (for `opened`, or the client's next message) until it is collected.
            for task in feeding:
                task.cancel()

    # -- Stats -------------------------------------------------------------------------------------
    async def stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        try:
            await self.guard.authenticate(context, admin=True)
        except StreamError as error:
            await context.abort(error.code, error.message)
        metadata = self.guard.replica_metadata(ANONYMOUS)

        async def one(backend: Backend) -> pb.StatsResponse | None:
            method = backend.channel().unary_unary(
                STATS_METHOD,
                request_serializer=pb.StatsRequest.SerializeToString,
                response_deserializer=pb.StatsResponse.FromString,
            )
            with contextlib.suppress(grpc.aio.AioRpcError):
                return await method(pb.StatsRequest(), timeout=2.0, metadata=metadata)
            return None

        answers = await asyncio.gather(*(one(b) for b in list(self.backends.values())))
        response = pb.StatsResponse(
            gateway_rss_bytes=psutil.Process().memory_info().rss,
            gateway_hostname=socket.gethostname(),
            gateway_pid=os.getpid(),
        )
        for answer in answers:
            if answer is None:
                continue
            response.replicas.extend(answer.replicas)
            response.sessions += answer.sessions
            response.slots_total += answer.slots_total
            response.slots_used += answer.slots_used
            response.slots_free += answer.slots_free
            response.sessions_offloaded += answer.sessions_offloaded
        response.sessions_stored = response.store_rows = response.store_bytes = -1
        if self.store is not None:
            with contextlib.suppress(StoreUnavailableError, TimeoutError):
                usage = await asyncio.wait_for(self.store.usage(), STORE_TIMEOUT_S)
                response.sessions_stored = usage.live
                response.store_rows, response.store_bytes = usage.rows, usage.bytes
        return response

    async def close(self) -> None:
        await self.health.enter_graceful_shutdown()
        for backend in self.backends.values():
            await backend.close()
