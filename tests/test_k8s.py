"""The KubeRay manifests agree with the code and with themselves (no cluster needed)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

from deployments.settings import AppSettings

MANIFESTS = sorted((Path(__file__).resolve().parent.parent / "k8s").glob("rayservice-*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_app(path: Path) -> None:
    service, grpc_service = list(yaml.safe_load_all(path.read_text()))
    assert service["kind"] == "RayService" and grpc_service["kind"] == "Service"
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, attribute = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    settings = AppSettings.from_args(app["args"])  # every key known, every value parses

    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    gateway_pods, gpus = 0, 0
    for group in groups:
        resources = json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))
        count = group.get("replicas", 1)
        if resources.get(settings.gateway_resource):
            gateway_pods += count
            labels = group["template"]["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in grpc_service["spec"]["selector"].items())
            ports = [
                p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]
            ]
            assert settings.port in ports
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += int(limits.get("nvidia.com/gpu", 0)) * count
    assert settings.gateways == gateway_pods, "one gateway per pod that the Service targets"
    assert grpc_service["spec"]["ports"][0]["targetPort"] == settings.port
    if settings.gpus_per_replica:
        assert settings.replicas * settings.gpus_per_replica <= gpus
