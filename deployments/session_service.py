"""The replica side of the gRPC contract: session streams served from one engine.

The servicer translates messages; what happens to sessions (open, resume and rebuild, offload,
checkpoints, drain) is deployments.replica_sessions. No Ray here: the Serve deployment
(deployments/replica.py) and the Ray-free launcher (deployments/standalone.py) both start a
replica server with `start_replica_server`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deployments.backpressure import ReplyBuffer
from deployments.convert import (
    append_input,
    generation_params,
    rejected_message,
    server_message,
    status_for,
)
from deployments.internal import (
    FROM_REPLICA,
    NO_FREE_SLOT,
    OWNER_KEY,
    GatewaysOnly,
    error_mark,
    internal_token,
    metadata_value,
)
from deployments.replica_sessions import Attached, ReplicaSessions
from deployments.resume import resume_token
from deployments.settings import AppSettings
from deployments.store import SessionStore
from sinkcache.errors import ArenaFullError, InvalidRequestError
from sinkcache.events import TurnEndEvent
from sinkcache.host.protocol import Engine
from sinkwire.options import server_options
from sinkwire.status import StreamError
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_END = object()  # ends a stream normally
# Appends a stream may have waiting for their turn; past it the stream stops reading the client
# (HTTP/2 flow control then holds the client's writes), so a client cannot queue without bound.
MAX_QUEUED_TURNS = 64


class _Rejected:
    """An append refused on its own: its place in the stream's turns, and why."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class SessionServicer(pb_grpc.StreamingLLMServicer):
    """The replica side of the contract: one Session stream per connected client."""

    def __init__(self, sessions: ReplicaSessions) -> None:
        self.sessions = sessions
        self.engine = sessions.engine

    async def Session(self, request_iterator, context) -> AsyncIterator[pb.ServerMessage]:
        out = ReplyBuffer(self.sessions.settings.max_buffered_tokens)
        # The API key name the gateway vouches for ("" without keys); GatewaysOnly checked it.
        owner = metadata_value(context.invocation_metadata(), OWNER_KEY) or ""
        session_id, closed, reader = None, False, None
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None:
                return
            attached = await self._start(first, owner)
            session_id = attached.info.session_id
            self.sessions.attach(session_id, out)
            out.watch(functools.partial(self.engine.hold_decode, session_id))
            yield self._opened(attached, owner)
            position = attached.info.stream_pos
            reader = asyncio.create_task(self._read(request_iterator, session_id, out, position))
            while True:
                item = await out.get()
                if item is _END:
                    return
                if isinstance(item, StreamError):
                    raise item
                if item.HasField("closed"):
                    closed = True
                yield item
        except Exception as error:  # every failure becomes a status; the session itself stays
            status = status_for(error)
            if status.code == grpc.StatusCode.INTERNAL:
                log.exception("session stream failed")
            mark = NO_FREE_SLOT if isinstance(error, ArenaFullError) else FROM_REPLICA
            await context.abort(status.code, status.message, trailing_metadata=error_mark(mark))
        finally:
            if reader is not None:
                reader.cancel()
            if session_id is not None:
                if self.sessions.holds_stream(session_id, out):
                    out.release()  # before detach cancels the reply: a held reply must drain
                self.sessions.detach(session_id, out, closed)

    async def _start(self, first: pb.ClientMessage, owner: str) -> Attached:
        """Open or resume the session the stream's first message names, for `owner`."""
        kind = first.WhichOneof("kind")
        if kind == "open":
            return await self.sessions.open(owner)
        if kind == "resume":
            resume = first.resume
            return await self.sessions.resume(resume.session_id, resume.resume_token, owner)
        raise StreamError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "the first message of a stream must be open or resume",
        )

    def _opened(self, attached: Attached, owner: str) -> pb.ServerMessage:
        info, replica_id = attached.info, self.sessions.replica_id
        secret = self.sessions.settings.resume_secret
        return pb.ServerMessage(
            opened=pb.Opened(
                session_id=info.session_id,
                resume_token=resume_token(secret, info.session_id, owner),
                replica_id=replica_id,
                sink_tokens=info.sink,
                window_tokens=info.window,
                capacity=info.capacity,
                stream_position=info.stream_pos,
                resumed=attached.resumed,
                model=self.sessions.settings.engine.model,
                rebuilt=attached.rebuilt,
            ),
            replica_id=replica_id,
        )

    async def _read(
        self, request_iterator, session_id: str, out: asyncio.Queue, position: int
    ) -> None:
        """Client messages in, one turn at a time out (turns run in order, as the engine does).
        An append that is invalid on its own becomes a REJECTED turn in its place; only messages
        out of protocol end the stream."""
        turns: asyncio.Queue = asyncio.Queue(MAX_QUEUED_TURNS)
        forwarder = asyncio.create_task(self._forward(turns, out, session_id, position))
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "append":
                    if self.sessions.draining:  # accepted turns finish; this one goes elsewhere
                        await turns.join()
                        raise StreamError(
                            grpc.StatusCode.UNAVAILABLE,
                            "replica draining: resume the session and send the turn again",
                        )
                    await turns.put(await self._submit(session_id, message.append))
                elif kind == "cancel":
                    await self.engine.cancel(session_id)
                elif kind == "close":
                    stream_pos = await self.sessions.close(session_id)
                    await turns.join()
                    closed = pb.Closed(stream_position=stream_pos)
                    out.put_nowait(
                        pb.ServerMessage(closed=closed, replica_id=self.sessions.replica_id)
                    )
                    out.put_nowait(_END)
                    return
                elif kind in ("open", "resume"):
                    raise StreamError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"this stream already has session {session_id}",
                    )
                else:
                    raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "empty client message")
            await turns.join()  # the client finished sending: end after the last reply
            out.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            out.put_nowait(status_for(error))
        finally:
            forwarder.cancel()

    async def _submit(self, session_id: str, append: pb.Append) -> AsyncIterator | _Rejected:
        """The append's event stream, or its rejection if it is invalid on its own."""
        try:
            item, params = append_input(append), generation_params(append)
        except StreamError as error:
            if error.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            return _Rejected(error)
        await self.sessions.before_append(session_id)
        try:
            return await self.engine.append(session_id, item, params, append.score)
        except InvalidRequestError as error:
            self.sessions.append_refused(session_id)
            return _Rejected(error)
        except BaseException:
            self.sessions.append_refused(session_id)
            raise

    async def _forward(
        self, turns: asyncio.Queue, out: asyncio.Queue, session_id: str, position: int
    ) -> None:
        """Each turn's events as messages, in order; `position` follows the stream so that a
        rejected turn can say where the stream stands."""
        replica_id = self.sessions.replica_id
        while True:
            turn = await turns.get()
            if isinstance(turn, _Rejected):
                out.put_nowait(rejected_message(turn.error, position, replica_id))
                turns.task_done()
                continue
            try:
                async for event in turn:
                    if isinstance(event, TurnEndEvent):
                        position = event.stream_pos
                        # Its checkpoint came with it from the engine: in the store first.
                        await self.sessions.turn_durable(session_id)
                    out.put_nowait(server_message(event, replica_id))
            except InvalidRequestError as error:  # refused when its turn came (nothing to feed)
                out.put_nowait(rejected_message(error, position, replica_id))
            except Exception as error:
                out.put_nowait(status_for(error))
            finally:
                self.sessions.turn_ended(session_id)
                turns.task_done()

    async def Stats(self, request, context) -> pb.StatsResponse:
        stats = await replica_stats(self.sessions)
        return pb.StatsResponse(
            replicas=[stats],
            sessions=stats.sessions,
            slots_total=stats.slots_total,
            slots_used=stats.slots_used,
            slots_free=stats.slots_free,
            sessions_offloaded=stats.sessions_offloaded,
            sessions_stored=-1,  # the gateway's answer says (it asks the store once)
            store_rows=-1,
            store_bytes=-1,
        )


async def replica_stats(sessions: ReplicaSessions) -> pb.ReplicaStats:
    stats = await sessions.engine.stats()
    writer = sessions.writer
    return pb.ReplicaStats(
        replica_id=sessions.replica_id,
        sessions=stats.sessions,
        slots_total=stats.slots_total,
        slots_used=stats.slots_used,
        slots_free=stats.slots_free,
        generated_tokens=stats.generated_tokens,
        steps=stats.steps,
        step_ms_p50=stats.step_ms_p50,
        kv_bytes=stats.kv_bytes,
        device=stats.device,
        model=sessions.settings.engine.model,
        # this process plus the engine's own when it runs in a child process
        process_rss_bytes=psutil.Process().memory_info().rss + stats.engine_rss_bytes,
        decode_tokens=stats.decode_tokens,
        prefill_tokens=stats.prefill_tokens,
        sessions_offloaded=sessions.offloaded,
        checkpoints_written=writer.written if writer else 0,
        checkpoint_failures=writer.failures if writer else 0,
        draining=sessions.draining,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        engine_pid=stats.engine_pid,
        sessions_by_key=sessions.owner_counts(),
        decode_held=stats.decode_held,
    )


async def start_replica_server(
    engine: Engine,
    replica_id: str,
    settings: AppSettings,
    port: int = 0,
    store: SessionStore | None = None,
    host: str = "127.0.0.1",
) -> tuple[grpc.aio.Server, ReplicaSessions, health.aio.HealthServicer, int]:
    """Serve `engine`'s sessions on `host`:`port` (0: any free port); returns the bound port too.
    With a `store`, sessions are checkpointed there and rebuilt from it. `host` is the address
    gateways reach this node by (the pod's, on Kubernetes), never all of them, and only callers
    with the internal credential are served (deployments/internal.py)."""
    sessions = ReplicaSessions(engine, replica_id, settings, store)
    await sessions.start()
    server = grpc.aio.server(
        options=server_options(max_message_bytes=settings.max_message_bytes),
        interceptors=[GatewaysOnly(internal_token(settings.resume_secret))],
    )
    pb_grpc.add_StreamingLLMServicer_to_server(SessionServicer(sessions), server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    await server.start()
    await health_service.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, sessions, health_service, bound
