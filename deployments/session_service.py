"""The replica side of the gRPC contract: session streams served from one engine.

No Ray here: the Serve deployment (deployments/replica.py) and the Ray-free launcher
(deployments/standalone.py) both start a replica server with `start_replica_server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
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
from deployments.quotas import SessionOwners
from deployments.resume import check_resume, resume_token
from deployments.settings import AppSettings
from sinkcache.errors import ArenaFullError, InvalidRequestError, SessionNotFoundError
from sinkcache.events import TurnEndEvent
from sinkcache.host.protocol import Engine, SessionInfo
from sinkwire.options import server_options
from sinkwire.session_ids import new_session_id
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


class ReplicaSessions:
    """Which stream each session is attached to; sessions with none expire after a TTL."""

    def __init__(self, engine: Engine, replica_id: str, settings: AppSettings) -> None:
        self.engine = engine
        self.replica_id = replica_id
        self.settings = settings
        self.attached: dict[str, asyncio.Queue] = {}
        self.detached_since: dict[str, float] = {}
        self.owners = SessionOwners()  # the API key name each session belongs to

    def opened_message(self, info: SessionInfo, resumed: bool, owner: str = "") -> pb.ServerMessage:
        return pb.ServerMessage(
            opened=pb.Opened(
                session_id=info.session_id,
                resume_token=resume_token(self.settings.resume_secret, info.session_id, owner),
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
        self, first: pb.ClientMessage, out: asyncio.Queue, owner: str = ""
    ) -> tuple[str, pb.ServerMessage]:
        """Open or resume the session the stream's first message names; the stream now owns it.
        `owner` is the API key name the gateway vouches for ("" without keys)."""
        kind = first.WhichOneof("kind")
        if kind == "open":
            info = await _open_unless_left(self.engine, new_session_id(self.replica_id))
            resumed = False
        elif kind == "resume":
            session_id = first.resume.session_id
            if not session_id:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "resume needs a session_id")
            # The token first: a caller without it learns nothing and makes nothing wait.
            check_resume(
                self.settings.resume_secret,
                session_id,
                first.resume.resume_token,
                owner,
                self.owners.get(session_id),
            )
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
        self.owners.record(info.session_id, owner)
        return info.session_id, self.opened_message(info, resumed, owner)

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


async def _open_unless_left(engine: Engine, session_id: str) -> SessionInfo:
    """Open a session; if the stream goes away while it opens (its caller is cancelled), close it
    once it is open: nobody learned its id, so it would hold its slot forever (found by fuzzing)."""
    opening = asyncio.ensure_future(engine.open_session(session_id))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:

        def close_orphan(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                task = asyncio.ensure_future(engine.close(session_id))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

        opening.add_done_callback(close_orphan)
        raise


class SessionServicer(pb_grpc.StreamingLLMServicer):
    """The replica side of the contract: one Session stream per connected client."""

    def __init__(self, sessions: ReplicaSessions) -> None:
        self.sessions = sessions
        self.engine = sessions.engine

    async def Session(self, request_iterator, context) -> AsyncIterator[pb.ServerMessage]:
        out = ReplyBuffer(self.sessions.settings.max_buffered_tokens)
        owner = metadata_value(context.invocation_metadata(), OWNER_KEY) or ""
        session_id, closed, reader = None, False, None
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None:
                return
            session_id, opened = await self.sessions.attach(first, out, owner)
            out.watch(functools.partial(self.engine.hold_decode, session_id))
            yield opened
            position = opened.opened.stream_position
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
                if self.sessions.attached.get(session_id) is out:
                    out.release()  # before detach cancels the reply: a held reply must drain
                self.sessions.detach(session_id, out, closed)

    async def _read(
        self, request_iterator, session_id: str, out: asyncio.Queue, position: int
    ) -> None:
        """Client messages in, one turn at a time out (turns run in order, as the engine does).
        An append that is invalid on its own becomes a REJECTED turn in its place; only messages
        out of protocol end the stream."""
        turns: asyncio.Queue = asyncio.Queue(MAX_QUEUED_TURNS)
        forwarder = asyncio.create_task(self._forward(turns, out, position))
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "append":
                    await turns.put(await self._submit(session_id, message.append))
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

    async def _submit(self, session_id: str, append: pb.Append) -> AsyncIterator | _Rejected:
        """The append's event stream, or its rejection if it is invalid on its own."""
        try:
            item, params = append_input(append), generation_params(append)
            return await self.engine.append(session_id, item, params, append.score)
        except InvalidRequestError as error:
            return _Rejected(error)
        except StreamError as error:
            if error.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            return _Rejected(error)

    async def _forward(self, turns: asyncio.Queue, out: asyncio.Queue, position: int) -> None:
        """Each turn's events as messages, in order; `position` follows the stream so that a
        rejected turn can say where the stream stands."""
        replica_id = self.sessions.replica_id
        while True:
            turn = await turns.get()
            try:
                if isinstance(turn, _Rejected):
                    out.put_nowait(rejected_message(turn.error, position, replica_id))
                    continue
                async for event in turn:
                    if isinstance(event, TurnEndEvent):
                        position = event.stream_pos
                    out.put_nowait(server_message(event, replica_id))
            except InvalidRequestError as error:  # refused when its turn came (nothing to feed)
                out.put_nowait(rejected_message(error, position, replica_id))
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


def owner_counts(sessions: ReplicaSessions) -> dict[str, int]:
    """Sessions held here by API key name: what gateways count against `max_sessions`."""
    return sessions.owners.counts(sessions.attached.keys() | sessions.detached_since.keys())


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
        sessions_by_key=owner_counts(sessions),
        decode_held=stats.decode_held,
    )


async def start_replica_server(
    engine: Engine, replica_id: str, settings: AppSettings, port: int = 0, host: str = "127.0.0.1"
) -> tuple[grpc.aio.Server, ReplicaSessions, health.aio.HealthServicer, int]:
    """Serve `engine`'s sessions on `host`:`port` (0: any free port); returns the bound port too.
    `host` is the address gateways reach this node by (the pod's, on Kubernetes), never all of
    them, and only callers with the internal credential are served (deployments/internal.py)."""
    sessions = ReplicaSessions(engine, replica_id, settings)
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
