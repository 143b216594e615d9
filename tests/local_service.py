"""A real service without Ray, in this process: an engine process (tiny random model on CPU), a
replica's gRPC server and a gateway, all on loopback, their event loop on a background thread.

Tests talk to it over gRPC like any client (from their own event loop or blocking), and can read
the replica's state through `call` (which runs a coroutine on the service's loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any

import grpc

from deployments.gateway_guard import GatewayGuard, gateway_credentials
from deployments.gateway_service import SESSION_METHOD, GatewayService
from deployments.internal import gateway_metadata, internal_token
from deployments.secrets import check_resume_secret
from deployments.session_service import start_replica_server
from deployments.settings import AppSettings
from sinkwire.channels import Credentials, aio_channel
from sinkwire.v1 import streaming_llm_pb2 as pb
from tests.service import free_port

REPLICA_ID = "r0"


class LocalService:
    """Start with `with LocalService(slots=8) as service:`; `service.address` is the gateway."""

    def __init__(self, engine_process: bool = True, poll_s: float = 0.2, **settings: Any) -> None:
        values = {
            "model": "tiny",
            "slots": 8,
            "window": 60,
            "torch_threads": 1,
            "host": "127.0.0.1",
        }
        values.update(settings)
        self.settings = AppSettings.from_args(values)
        self.settings.engine_process = engine_process
        self.settings.validate()
        check_resume_secret(self.settings, single_node=True)
        self.poll_s = poll_s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.address = ""
        self.replica_address = ""

    # -- life ----------------------------------------------------------------------------------------
    def __enter__(self) -> LocalService:
        self._thread.start()
        self.call(self._start(), timeout=300)
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._stop(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def call(self, coroutine, timeout: float = 60) -> Any:
        """Run `coroutine` on the service's loop and return its result (from any thread)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    async def acall(self, coroutine, timeout: float = 60) -> Any:
        """`call` for a test's own event loop."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    async def _start(self) -> None:
        from sinkcache.host.start import start_engine

        settings = self.settings
        self.engine = await start_engine(settings.engine, in_process=not settings.engine_process)
        self.replica_server, self.sessions, _, port = await start_replica_server(
            self.engine, REPLICA_ID, settings, 0, host="127.0.0.1"
        )
        self.replica_address = f"127.0.0.1:{port}"
        self.gateway = GatewayService(guard=GatewayGuard.from_settings(settings))
        gateway_port = free_port()
        self.gateway_server = await self.gateway.start(
            settings.listen_host, gateway_port, credentials=gateway_credentials(settings)
        )
        self.address = f"127.0.0.1:{gateway_port}"
        await self._update()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll()), loop.create_task(self.sessions.sweep())]

    async def _update(self) -> None:
        stats = await self.engine.stats()
        info = {
            "replica_id": REPLICA_ID,
            "address": self.replica_address,
            "slots_free": stats.slots_free,
            "owners": self.sessions.owner_counts(),
        }
        await self.gateway.update([info])

    async def _poll(self) -> None:
        """What the directory does for a Serve gateway."""
        while True:
            await asyncio.sleep(self.poll_s)
            await self._update()

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.gateway.close()
        await self.gateway_server.stop(grace=1)
        await self.replica_server.stop(grace=1)
        await self.engine.shutdown()

    # -- views ---------------------------------------------------------------------------------------
    def stats(self):
        return self.call(self.engine.stats())

    def internal_metadata(self, owner: str = "") -> tuple[tuple[str, str], ...]:
        return gateway_metadata(internal_token(self.settings.resume_secret), owner)


@dataclass
class Ended:
    """How one stream went: the server messages it got, then its status."""

    messages: list[pb.ServerMessage]
    code: grpc.StatusCode
    details: str

    def kinds(self) -> list[str]:
        return [m.WhichOneof("kind") for m in self.messages]

    def turn_ends(self) -> list[pb.TurnEnd]:
        return [m.turn_end for m in self.messages if m.HasField("turn_end")]


async def exchange(
    address: str,
    messages: list[pb.ClientMessage | bytes],
    credentials: Credentials | None = None,
    metadata: tuple[tuple[str, str], ...] | None = None,
    options: list[tuple[str, Any]] = (),
    timeout: float = 60,
) -> Ended:
    """Send `messages` (or raw bytes) on a fresh stream, finish sending, read it to its end."""
    raw = [m if isinstance(m, bytes) else m.SerializeToString() for m in messages]
    async with aio_channel(address, credentials or Credentials(), options) as channel:
        call = channel.stream_stream(SESSION_METHOD)(iter(raw), metadata=metadata)
        received = []
        try:
            async with asyncio.timeout(timeout):
                async for reply in call:
                    received.append(pb.ServerMessage.FromString(reply))
        except grpc.aio.AioRpcError as error:
            return Ended(received, error.code(), error.details() or "")
        return Ended(received, await call.code(), await call.details() or "")
