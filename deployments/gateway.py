"""Gateway: the public gRPC endpoint, a thin router in front of the replicas.

A Serve shell around deployments.gateway_service.GatewayService: it listens on the public port and
keeps the service's list of replicas fresh from the directory. Up to `max_gateways_per_node`
gateways share a node's port (SO_REUSEPORT), so one dying does not close it.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from deployments.gateway_guard import GatewayGuard, gateway_credentials
from deployments.gateway_service import GatewayService
from deployments.openai_front import HttpDoor, OpenAIFront
from deployments.settings import AppSettings
from deployments.store import open_store

log = logging.getLogger("ray.serve")
# How often a gateway reads the replica directory: a replica that has just started (or gone)
# reaches every gateway's routing within this.
DIRECTORY_POLL_S = 0.5


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Gateway:
    async def __init__(self, settings: AppSettings, directory, replicas) -> None:
        self.directory = directory
        self.replicas = replicas  # bound so Serve deploys the replicas with the app
        self.settings = settings
        self.gateway_id = serve.get_replica_context().replica_id.unique_id
        url = settings.store_url()
        self.service = GatewayService(
            open_store(url, settings.session_ttl_s) if url else None,
            guard=GatewayGuard.from_settings(settings),
        )
        host = settings.listen_host
        self.server = await self.service.start(
            host,
            settings.port,
            reuse_port=settings.max_gateways_per_node > 1,
            credentials=gateway_credentials(settings),
        )
        self._poll = asyncio.get_running_loop().create_task(self._watch_directory())
        self.http = None
        if settings.openai_port:
            front = OpenAIFront(
                self.service,
                settings.engine.model,
                DirectoryLedger(directory, settings.session_ttl_s),
                settings.max_message_bytes,
            )
            self.http = HttpDoor(front)
            await self.http.start(
                host,
                settings.openai_port,
                reuse_port=settings.max_gateways_per_node > 1,
                tls_cert=settings.tls_cert,
                tls_key=settings.tls_key,
                tls_client_ca=settings.tls_client_ca,
            )
            log.info("sinkserve OpenAI-compatible HTTP on %s:%d", host, settings.openai_port)
        # Under `serve run`, Serve also prints an http:// address: that is its HTTP proxy, which
        # this gRPC service does not use.
        log.info(
            "sinkserve gRPC gateway listening on %s:%d (sinkserve chat --target HOST:%d)",
            host,
            settings.port,
            settings.port,
        )

    async def _watch_directory(self) -> None:
        quotas = self.service.guard.quotas
        while True:
            try:
                await self.service.update(await self.directory.replicas.remote())
                # tokens_per_s holds across gateways: trade what each charged to which key
                others = await self.directory.share_charges.remote(
                    self.gateway_id, quotas.take_charges()
                )
                quotas.charge_others(others)
            except Exception:
                log.warning("cannot read the replica directory", exc_info=True)
            await asyncio.sleep(DIRECTORY_POLL_S)

    def backends(self) -> int:
        """Replicas this gateway routes to (readiness, without a client's credentials)."""
        return len(self.service.backends)

    async def check_health(self) -> None:
        if self._poll.done():
            raise RuntimeError("the gateway stopped watching the directory")

    async def __del__(self) -> None:
        """Stop taking streams, but keep piping the open ones while the replicas drain (they end
        each stream with UNAVAILABLE once its session is safe), then close the channels."""
        if hasattr(self, "server"):
            await self.service.health.enter_graceful_shutdown()
            grace = self.settings.drain_timeout_s + 5
            http = self.http.stop(grace) if self.http is not None else asyncio.sleep(0)
            await asyncio.gather(self.server.stop(grace=grace), http)
            self._poll.cancel()
            await self.service.close()


class DirectoryLedger:
    """The HTTP API's ledger (deployments/openai_sessions.py), kept by the replica directory so
    that every gateway sees the same one."""

    def __init__(self, directory, ttl_s: float) -> None:
        self.directory = directory
        self.ttl_s = ttl_s

    async def get(self, key: str) -> dict | None:
        return await self.directory.ledger_get.remote(key)

    async def put(self, key: str, value: dict) -> None:
        await self.directory.ledger_put.remote(key, value, self.ttl_s)
