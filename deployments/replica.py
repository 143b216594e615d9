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
from deployments.session_service import start_replica_server
from deployments.settings import AppSettings
from deployments.store import StoreUpkeep, open_store
from sinkcache.errors import EngineStoppedError

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
        url = settings.store_url()
        store = open_store(url, ttl_s=settings.session_ttl_s) if url else None
        self.engine = await start_engine(settings.engine, in_process=not settings.engine_process)
        self.metrics = ReplicaMetrics(self.replica_id)
        # The node's (pod's) address only, never every interface: gateways reach it there.
        host = ray.util.get_node_ip_address()
        self.server, self.sessions, self.health, port = await start_replica_server(
            self.engine, self.replica_id, settings, store=store, host=host
        )
        self.address = f"{host}:{port}"
        self.directory = directory
        self._last_stats = None
        # Expired sessions leave the store (one sweep per period for the whole service).
        self.upkeep = StoreUpkeep(store) if store is not None else None
        self._tasks = [
            loop.create_task(self.sessions.sweep()),
            *([loop.create_task(self.upkeep.run())] if self.upkeep is not None else []),
            loop.create_task(self._heartbeat()),
            loop.create_task(self._record_metrics()),
        ]
        log.info("replica %s serving sessions on %s", self.replica_id, self.address)

    @property
    def accepting(self) -> bool:
        """Takes new and resumed sessions: not draining, engine alive."""
        return not self.sessions.draining and self.engine.error is None

    async def info(self) -> dict:
        try:
            stats = self._last_stats = await self.engine.stats()
        except EngineStoppedError:  # still in the directory, taking nothing, until replaced
            if self._last_stats is None:
                raise
            stats = self._last_stats
        accepting = self.accepting
        return {
            "replica_id": self.replica_id,
            "address": self.address,
            "slots_free": stats.slots_free if accepting else 0,
            "slots_total": stats.slots_total,
            "sessions": stats.sessions,
            "held": stats.sessions + self.sessions.offloaded,
            "accepting": accepting,
            "owners": self.sessions.owner_counts(),  # for the gateways' max_sessions quotas
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What deployments.autoscaling.SlotOccupancyPolicy scales on (Serve asks periodically)."""
        stats = self._last_stats or await self.engine.stats()
        return {"slots_used": float(stats.slots_used), "slots_total": float(stats.slots_total)}

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
                    await self.engine.stats(),
                    await self.engine.take_step_seconds(),
                    offloaded=self.sessions.offloaded,
                    checkpoint_failures=self.sessions.writer.failures
                    if self.sessions.writer
                    else 0,
                    store_usage=self.upkeep.usage if self.upkeep is not None else None,
                )
            except EngineStoppedError:
                return  # the health check reports the engine's end; Serve replaces the replica
            except Exception:
                log.warning("recording metrics failed", exc_info=True)
            await asyncio.sleep(1.0)

    async def check_health(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"engine failed: {self.engine.error}")

    async def __del__(self) -> None:
        """Drain (scale-in, redeploy, shutdown): stop taking sessions, let replies finish, leave
        every session in the store for another replica, then end the streams with UNAVAILABLE so
        their clients resume elsewhere."""
        if not hasattr(self, "server"):
            return
        self.sessions.draining = True
        # Stop routing here now. Bounded, as every call to the directory below: when the whole
        # app is deleted the directory may be gone already, and a call to a deployment without
        # replicas waits until Serve force-kills this one (which made every stop of `sinkserve
        # serve` wait out drain_timeout_s + 10 s).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.directory.heartbeat.remote(await self.info()), 2.0)
        await self.health.enter_graceful_shutdown()
        try:
            await self.sessions.drain(self.settings.drain_timeout_s)
        except Exception:
            log.exception("drain failed")
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.directory.leave.remote(self.replica_id), 2.0)
        self.sessions.end_streams()
        await self.server.stop(grace=2)
        await self.engine.shutdown()
