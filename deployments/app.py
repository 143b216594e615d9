"""The Serve application: gateways (two per node by default), the session replicas, and their
directory.

serve run deployments.app:build_app model=tiny replicas=2 port=50051
# KubeRay serveConfigV2: import_path: deployments.app:build_app, args: {...}
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.checks import SettingsError, building_for_a_local_cluster, check_settings
from deployments.directory import ReplicaDirectory
from deployments.gateway import Gateway
from deployments.replica import SessionReplica
from deployments.secrets import check_resume_secret
from deployments.settings import AppSettings


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _single_node(settings: AppSettings) -> bool:
    """Whether the whole app runs on one node (then it may make its resume secret up)."""
    import ray

    if settings.gateways > settings.max_gateways_per_node or settings.gateway_resource:
        return False
    return not ray.is_initialized() or sum(1 for n in ray.nodes() if n["Alive"]) <= 1


def build_app(args: dict[str, Any] | AppSettings | None = None) -> Application:
    """Build the application from settings (a dict of strings from `serve run` / KubeRay works)."""
    settings = args if isinstance(args, AppSettings) else _settings_from(args)
    # One line now rather than a replica failing three times after Ray has started.
    check_settings(settings, local=building_for_a_local_cluster())
    check_resume_secret(settings, _single_node(settings))
    gpus = settings.gpus_per_replica
    if gpus is None:
        gpus = 1 if _cluster_has_gpus() else 0
    directory = ReplicaDirectory.bind()
    scaling: dict[str, Any] = {"num_replicas": settings.replicas}
    if settings.autoscaling:
        scaling = {
            "num_replicas": "auto",
            "autoscaling_config": {
                "min_replicas": settings.min_replicas,
                "initial_replicas": settings.replicas,
                "max_replicas": settings.max_replicas,
                "metrics_interval_s": 2.0,
                "look_back_period_s": 10.0,
                "upscale_delay_s": 5.0,
                "downscale_delay_s": 0.0,  # the policy waits itself, on occupancy
                "policy": {
                    "policy_function": "deployments.autoscaling:SlotOccupancyPolicy",
                    "policy_kwargs": {"target": settings.target_slot_occupancy},
                },
            },
        }
    replicas = SessionReplica.options(
        **scaling,
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": gpus},
        # Time to drain: replies in flight finish, every session is checkpointed.
        graceful_shutdown_timeout_s=settings.drain_timeout_s + 10,
        # A replica whose engine died says so at once (check_health); notice it within seconds.
        health_check_period_s=2,
        health_check_timeout_s=10,
    ).bind(settings, directory)
    gateway_actor = {"num_cpus": 0}
    if settings.gateway_resource:
        gateway_actor["resources"] = {settings.gateway_resource: 1}
    return Gateway.options(
        num_replicas=settings.gateways,
        max_replicas_per_node=settings.max_gateways_per_node,
        ray_actor_options=gateway_actor,
        graceful_shutdown_timeout_s=settings.drain_timeout_s + 10,
    ).bind(settings, directory, replicas)


def _settings_from(args: dict[str, Any] | None) -> AppSettings:
    try:
        return AppSettings.from_args(args)
    except ValueError as error:
        raise SettingsError(str(error)) from None
