"""The replica side of the gRPC contract: session streams served from one engine.

No Ray here: the Serve deployment (deployments/replica.py) and the Ray-free launcher
(deployments/standalone.py) both start a replica server with `start_replica_server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deployments.convert import append_input, generation_params, server_message, status_for
from deployments.resume import resume_token, token_matches
from deployments.settings import AppSettings
from sinkcache.errors import SessionNotFoundError
from sinkcache.host.protocol import Engine, SessionInfo
from sinkwire.options import SERVER_OPTIONS
from sinkwire.session_ids import new_session_id
from sinkwire.status import StreamError
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_END = object()  # ends a stream normally


class ReplicaSessions:
    """Which stream each session is attached to; sessions with none expire after a TTL."""

    def __init__(self, engine: Engine, replica_id: str, settings: AppSettings) -> None:
        self.engine = engine
        self.replica_id = replica_id
        self.settings = settings
        self.attached: dict[str, asyncio.Queue] = {}
        self.detached_since: dict[str, float] = {}

    def opened_message(self, info: SessionInfo, resumed: bool) -> pb.ServerMessage:
        return pb.ServerMessage(
            opened=pb.Opened(
                session_id=info.session_id,
                resume_token=resume_token(self.settings.resume_secret, info.session_id),
                replica_id=self.replica_id,
                sink_tokens=info.sink,
                window_tokens=info.window,
                capacity=info.capacity,
                stream_position=info.stream_pos,
                resumed=resumed,
                model=self.settings.engine.model,
            ),
            replica_id=self.replica_id,
        )

    async def attach(
        self, first: pb.ClientMessage, out: asyncio.Queue
    ) -> tuple[str, pb.ServerMessage]:
        """Open or resume the session the stream's first message names; the stream now owns it."""
        kind = first.WhichOneof("kind")
        if kind == "open":
            info = await self.engine.open_session(new_session_id(self.replica_id))
            resumed = False
        elif kind == "resume":
            session_id = first.resume.session_id
            if not session_id:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "resume needs a session_id")
            # The token first: a caller without it learns nothing and makes nothing wait.
            if not token_matches(
                self.settings.resume_secret, session_id, first.resume.resume_token
            ):
                raise StreamError(grpc.StatusCode.PERMISSION_DENIED, "wrong resume token")
            info = await self.engine.session_info(session_id, settled=True)
            resumed = True
        else:
            raise StreamError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the first message of a stream must be open or resume",
            )
        previous = self.attached.get(info.session_id)
        if previous is not None:  # the newest stream wins (a client reconnecting after a drop)
            previous.put_nowait(
                StreamError(grpc.StatusCode.ABORTED, "session resumed on another stream")
            )
        self.attached[info.session_id] = out
        self.detached_since.pop(info.session_id, None)
        return info.session_id, self.opened_message(info, resumed)

    def detach(self, session_id: str, out: asyncio.Queue, closed: bool) -> None:
        if self.attached.get(session_id) is not out:
            return
        del self.attached[session_id]
        if not closed:
            self.detached_since[session_id] = time.monotonic()
            asyncio.get_running_loop().create_task(self._cancel_quietly(session_id))

    async def _cancel_quietly(self, session_id: str) -> None:
        with contextlib.suppress(SessionNotFoundError):
            await self.engine.cancel(session_id)  # nobody is reading the reply any more

    async def expire(self) -> None:
        """Close sessions that have had no stream for longer than the TTL (forever, every 10 s)."""
        while True:
            await asyncio.sleep(min(10.0, self.settings.session_ttl_s))
            deadline = time.monotonic() - self.settings.session_ttl_s
            for session_id, since in list(self.detached_since.items()):
                if since < deadline:
                    self.detached_since.pop(session_id, None)
                    with contextlib.suppress(SessionNotFoundError):
                        await self.engine.close(session_id)
                    log.info(
                        "session %s expired after %.0f s detached",
                        session_id,
                        self.settings.session_ttl_s,
                    )


class SessionServicer(pb_grpc.StreamingLLMServicer):
    """The replica side of the contract: one Session stream per connected client."""

    def __init__(self, sessions: ReplicaSessions) -> None:
        self.sessions = sessions
        self.engine = sessions.engine

    async def Session(self, request_iterator, context) -> AsyncIterator[pb.ServerMessage]:
        out: asyncio.Queue = asyncio.Queue()
        session_id, closed, reader = None, False, None
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None:
                return
            session_id, opened = await self.sessions.attach(first, out)
            yield opened
            reader = asyncio.create_task(self._read(request_iterator, session_id, out))
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
            await context.abort(status.code, status.message)
        finally:
            if reader is not None:
                reader.cancel()
            if session_id is not None:
                self.sessions.detach(session_id, out, closed)

    async def _read(self, request_iterator, session_id: str, out: asyncio.Queue) -> None:
        """Client messages in, one turn at a time out (turns run in order, as the engine does)."""
        turns: asyncio.Queue = asyncio.Queue()
        forwarder = asyncio.create_task(self._forward(turns, out))
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "append":
                    append = message.append
                    stream = await self.engine.append(
                        session_id, append_input(append), generation_params(append), append.score
                    )
                    turns.put_nowait(stream)
                elif kind == "cancel":
                    await self.engine.cancel(session_id)
                elif kind == "close":
                    info = await self.engine.session_info(session_id)
                    await self.engine.close(session_id)
                    await turns.join()
                    closed = pb.Closed(stream_position=info.stream_pos)
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

    async def _forward(self, turns: asyncio.Queue, out: asyncio.Queue) -> None:
        replica_id = self.sessions.replica_id
        while True:
            stream = await turns.get()
            try:
                async for event in stream:
                    out.put_nowait(server_message(event, replica_id))
            except Exception as error:
                out.put_nowait(status_for(error))
            finally:
                turns.task_done()

    async def Stats(self, request, context) -> pb.StatsResponse:
        stats = await replica_stats(self.sessions)
        return pb.StatsResponse(
            replicas=[stats],
            sessions=stats.sessions,
            slots_total=stats.slots_total,
            slots_used=stats.slots_used,
            slots_free=stats.slots_free,
        )


async def replica_stats(sessions: ReplicaSessions) -> pb.ReplicaStats:
    stats = await sessions.engine.stats()
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
    )


async def start_replica_server(
    engine: Engine, replica_id: str, settings: AppSettings, port: int = 0
) -> tuple[grpc.aio.Server, ReplicaSessions, health.aio.HealthServicer, int]:
    """Serve `engine`'s sessions on `port` (0: any free port); returns the bound port too."""
    sessions = ReplicaSessions(engine, replica_id, settings)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_StreamingLLMServicer_to_server(SessionServicer(sessions), server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    bound = server.add_insecure_port(f"0.0.0.0:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen on port {port}")
    await server.start()
    await health_service.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, sessions, health_service, bound
