"""The Serve application: a gateway per node, the session replicas, and their directory.

serve run deployments.app:build_app model=tiny replicas=2 port=50051
# KubeRay serveConfigV2: import_path: deployments.app:build_app, args: {...}
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.directory import ReplicaDirectory
from deployments.gateway import Gateway
from deployments.replica import SessionReplica
from deployments.secrets import resolve_resume_secret
from deployments.settings import AppSettings


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _single_node(settings: AppSettings) -> bool:
    """Whether the whole app runs on one node (then it may make its resume secret up)."""
    import ray

    if settings.gateways > 1 or settings.gateway_resource:
        return False
    return not ray.is_initialized() or sum(1 for n in ray.nodes() if n["Alive"]) <= 1


def build_app(args: dict[str, Any] | AppSettings | None = None) -> Application:
    """Build the application from settings (a dict of strings from `serve run` / KubeRay works)."""
    settings = args if isinstance(args, AppSettings) else AppSettings.from_args(args)
    settings.validate()
    settings.resume_secret = resolve_resume_secret(settings.resume_secret, _single_node(settings))
    gpus = settings.gpus_per_replica
    if gpus is None:
        gpus = 1 if _cluster_has_gpus() else 0
    directory = ReplicaDirectory.bind()
    replicas = SessionReplica.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": gpus},
        # A replica's sessions live in its GPU memory: give it time to drain on shutdown.
        graceful_shutdown_timeout_s=30,
        health_check_period_s=10,
    ).bind(settings, directory)
    gateway_actor = {"num_cpus": 0}
    if settings.gateway_resource:
        gateway_actor["resources"] = {settings.gateway_resource: 1}
    return Gateway.options(
        num_replicas=settings.gateways,
        max_replicas_per_node=1,
        ray_actor_options=gateway_actor,
    ).bind(settings, directory, replicas)
