"""AppSettings: everything the Serve application is configured with, each setting declared once.

The engine's settings are `sinkcache.config.EngineConfig`, nested here as `engine`; the rest are
the service's. `serve run deployments.app:build_app key=value ...`, KubeRay's serveConfigV2 `args:`,
a YAML file (`sinkserve serve --config`) and the CLI's options all name settings by their flat field
names (`model`, `window`, `replicas`, ...); `from_args` routes each to where it is declared,
coerces strings, and refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sinkcache.config import EngineConfig, setting


@dataclass
class AppSettings:
    engine: EngineConfig = field(default_factory=EngineConfig)
    replicas: int = setting(1, "session replicas (one per GPU)")
    gpus_per_replica: float | None = setting(
        None,
        "GPUs per replica (e.g. 0.5: two share a GPU); default 1 on a cluster with GPUs, else 0",
    )
    cpus_per_replica: float = setting(0.0, "CPUs Ray reserves per replica")
    engine_process: bool = setting(
        True,
        "run each replica's engine in a child process, so the engine loop never waits for the "
        "gRPC server's GIL (off: on a thread of the replica, one process to debug)",
    )
    host: str = setting("0.0.0.0", "the gateway's listen address")
    port: int = setting(50051, "the gateway's public gRPC port")
    metrics_export_port: int | None = setting(
        None,
        "Prometheus port of the local Ray cluster `sinkserve serve` starts (default: a free "
        "port, printed with the ready line); on a cluster, Ray's own --metrics-export-port",
    )
    gateways: int = setting(1, "gateways (at most one per node)")
    gateway_resource: str | None = setting(
        None,
        "place gateways only on Ray nodes offering this custom resource (on Kubernetes: the pods "
        "a Service sends clients to)",
    )
    session_ttl_s: float = setting(3600.0, "seconds a session with no stream attached lives")
    resume_secret: str = field(
        default_factory=lambda: secrets.token_hex(32),
        metadata={
            "help": "HMAC key of resume tokens, shared by all replicas (default: "
            "$SINKSERVE_RESUME_SECRET, e.g. from a Kubernetes Secret, else random)",
            "env": "SINKSERVE_RESUME_SECRET",
        },
    )
    application: str = setting("sinkserve", "the Serve application's name")

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppSettings:
        """Settings from flat `name: value` pairs (strings are coerced); unknown names refused."""
        args = dict(args or {})
        engine_fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
        app_fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "engine"}
        unknown = sorted(set(args) - set(engine_fields) - set(app_fields))
        if unknown:
            known = ", ".join(name for name, _ in setting_fields())
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {known}")
        for name, f in app_fields.items():
            # Secrets may come from the environment (a Kubernetes Secret mapped into every pod's
            # env) instead of args, which KubeRay keeps in the RayService object in plain text.
            env_name = f.metadata.get("env")
            if name not in args and env_name and os.environ.get(env_name):
                args[name] = os.environ[env_name]
        engine = {k: _coerce(engine_fields[k], v) for k, v in args.items() if k in engine_fields}
        app = {k: _coerce(app_fields[k], v) for k, v in args.items() if k in app_fields}
        return cls(engine=EngineConfig(**engine), **app)

    def validate(self) -> None:
        """One line naming every setting that cannot work (before anything is deployed)."""
        problems = []
        try:
            self.engine.validate()
        except ValueError as error:
            problems.append(str(error))
        if self.replicas < 1:
            problems.append(f"replicas must be >= 1, got {self.replicas}")
        if self.gateways < 1:
            problems.append(f"gateways must be >= 1, got {self.gateways}")
        if not 0 < self.port < 65536:
            problems.append(f"port must be in 1..65535, got {self.port}")
        if self.metrics_export_port is not None and not 0 < self.metrics_export_port < 65536:
            problems.append(
                f"metrics_export_port must be in 1..65535, got {self.metrics_export_port}"
            )
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            problems.append(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        if not self.session_ttl_s > 0:
            problems.append(f"session_ttl_s must be > 0, got {self.session_ttl_s}")
        if problems:
            raise ValueError("; ".join(problems))


def setting_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """Every setting by its flat name, engine settings first (CLI options, docs, config files)."""
    for f in dataclasses.fields(EngineConfig):
        yield f.name, f
    for f in dataclasses.fields(AppSettings):
        if f.name != "engine":
            yield f.name, f


def setting_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of a settings field."""
    hint = typing.get_type_hints(_owner(f))[f.name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [a for a in args if a is not type(None)]
        return kinds[0], type(None) in args
    return hint, False


def _owner(f: dataclasses.Field) -> type:
    return (
        EngineConfig
        if f.name in {g.name for g in dataclasses.fields(EngineConfig)}
        else AppSettings
    )


def _coerce(f: dataclasses.Field, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    kind, optional = setting_type(f)
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        return kind(raw)
    except ValueError:
        raise ValueError(f"setting {f.name}={raw!r} is not a valid {kind.__name__}") from None
