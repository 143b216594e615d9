"""SessionReplica: one engine (one GPU when there are GPUs) serving session streams over gRPC.

Each replica runs its own grpc.aio server (deployments/session_service.py): the gateway pipes every
session stream straight to the replica that holds the session, so tokens travel replica -> gateway
-> client over HTTP/2 with no Ray call per message (why: docs/DEPLOYMENT.md). Serve still owns the
replica's life: placement, health checks, restarts. The replica tells the directory where it
listens and how full it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ray import serve

from deployments.metrics import ReplicaMetrics
from deployments.session_service import owner_counts, start_replica_server
from deployments.settings import AppSettings

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0})
class SessionReplica:
    """A thin Serve shell around one engine and its gRPC server."""

    async def __init__(self, settings: AppSettings, directory) -> None:
        import ray

        from sinkcache.host.start import start_engine

        self.settings = settings
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        loop = asyncio.get_running_loop()
        self.engine = await start_engine(settings.engine, in_process=not settings.engine_process)
        self.metrics = ReplicaMetrics(self.replica_id)
        # The node's (pod's) address only, never every interface: gateways reach it there.
        host = ray.util.get_node_ip_address()
        self.server, self.sessions, self.health, port = await start_replica_server(
            self.engine, self.replica_id, settings, host=host
        )
        self.address = f"{host}:{port}"
        self.directory = directory
        self._tasks = [
            loop.create_task(self.sessions.expire()),
            loop.create_task(self._heartbeat()),
            loop.create_task(self._record_metrics()),
        ]
        log.info("replica %s serving sessions on %s", self.replica_id, self.address)

    async def info(self) -> dict:
        stats = await self.engine.stats()
        return {
            "replica_id": self.replica_id,
            "address": self.address,
            "slots_free": stats.slots_free,
            "slots_total": stats.slots_total,
            "sessions": stats.sessions,
            "owners": owner_counts(self.sessions),  # for the gateways' max_sessions quotas
        }

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.directory.heartbeat.remote(await self.info())
            except Exception:  # the directory restarting; try again next beat
                log.warning("heartbeat to the directory failed", exc_info=True)
            await asyncio.sleep(1.0)

    async def _record_metrics(self) -> None:
        """Apart from the heartbeat: a busy engine may delay metrics, never the heartbeat."""
        while True:
            try:
                self.metrics.record(
                    await self.engine.stats(), await self.engine.take_step_seconds()
                )
            except Exception:
                log.warning("recording metrics failed", exc_info=True)
            await asyncio.sleep(1.0)

    async def check_health(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"engine failed: {self.engine.error}")

    async def __del__(self) -> None:
        for task in getattr(self, "_tasks", []):
            task.cancel()
        if hasattr(self, "server"):
            await self.health.enter_graceful_shutdown()
            with contextlib.suppress(Exception):
                await self.directory.leave.remote(self.replica_id)
            await self.server.stop(grace=5)
            await self.engine.shutdown()
