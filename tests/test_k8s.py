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
            assert settings.openai_port in ports  # the OpenAI-compatible HTTP door
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += int(limits.get("nvidia.com/gpu", 0)) * count
    assert settings.gateways == gateway_pods, "one gateway per pod that the Service targets"
    assert grpc_service["spec"]["ports"][0]["targetPort"] == settings.port
    assert settings.openai_port in [p["targetPort"] for p in grpc_service["spec"]["ports"]]
    if settings.gpus_per_replica:
        assert settings.replicas * settings.gpus_per_replica <= gpus


def test_manifests_can_share_a_namespace_and_keep_secrets_in_secrets() -> None:
    """Distinct Service names, selectors that pick only their own pods, and the resume secret
    from a Kubernetes Secret on every pod (never a value in the manifest)."""
    services, selectors = [], []
    for path in MANIFESTS:
        service, grpc_service = list(yaml.safe_load_all(path.read_text()))
        services.append(grpc_service["metadata"]["name"])
        selectors.append(grpc_service["spec"]["selector"])
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert "resume_secret" not in app["args"], f"{path.name}: a secret in the manifest"
        cluster = service["spec"]["rayClusterConfig"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            for container in group["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                ref = env["SINKSERVE_RESUME_SECRET"]["valueFrom"]["secretKeyRef"]
                assert ref["name"] and ref["key"]
    assert len(set(services)) == len(services), services
    for i, mine in enumerate(selectors):
        for j, other_path in enumerate(MANIFESTS):
            if i == j:
                continue
            service, _ = list(yaml.safe_load_all(other_path.read_text()))
            cluster = service["spec"]["rayClusterConfig"]
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                labels = group["template"]["metadata"]["labels"]
                assert not all(labels.get(k) == v for k, v in mine.items()), (
                    f"{services[i]} would also select pods of {other_path.name}"
                )


def test_the_resume_secret_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SINKSERVE_RESUME_SECRET", "from-a-secret")
    assert AppSettings.from_args({}).resume_secret == "from-a-secret"
    assert AppSettings.from_args({"resume_secret": "given"}).resume_secret == "given"
    monkeypatch.delenv("SINKSERVE_RESUME_SECRET")
    assert len(AppSettings.from_args({}).resume_secret) == 64  # random


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_keeps_its_secrets_in_secrets(path: Path) -> None:
    """API keys, TLS, the resume secret and the session store's URL come from Kubernetes Secrets
    on every pod (the gateways and replicas may run on any of them); no secret is written in the
    manifest."""
    service, _ = list(yaml.safe_load_all(path.read_text()))
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert "resume_secret" not in app["args"]
    settings = AppSettings.from_args(app["args"])
    assert settings.authenticates and settings.listen_host == "0.0.0.0" and not settings.insecure
    files = [settings.api_keys, settings.tls_cert, settings.tls_key]
    assert all(files)
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        secret_volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            for name in ("SINKSERVE_RESUME_SECRET", "SINKSERVE_SESSION_STORE"):
                assert "secretKeyRef" in env[name]["valueFrom"], (container["name"], name)
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            for file in files:  # each file lies in a mounted Secret
                directory = str(Path(file).parent)
                assert mounts.get(directory) in secret_volumes, (container["name"], file)
