"""AppSettings: everything the Serve application is configured with, in one place.

`serve run deployments.app:build_app key=value ...` and KubeRay's serveConfigV2 `args:` pass plain
strings; `from_args` turns them into typed settings and refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AppSettings:
    model: str = "default"
    sink: int = 4
    window: int = 1020
    replicas: int = 1
    slots: int | None = None  # per replica; None: from kv_memory_gib or the device
    kv_memory_gib: float | None = None
    dtype: str = "auto"
    device: str = "auto"
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 0.0
    torch_threads: int | None = None  # CPU engines: intra-op threads per replica
    cuda_graphs: bool = True
    # The engine runs in a child process of the replica, so its loop never waits for the gRPC
    # server's GIL; false keeps it on a thread of the replica process (one process to debug).
    engine_process: bool = True
    prefill_budget: int | None = None
    host: str = "0.0.0.0"
    port: int = 50051  # the gateway's public gRPC port
    gateways: int = 1  # one per node that should accept clients
    # Place gateways only on Ray nodes offering this custom resource (one unit per node): on
    # Kubernetes, the pods a Service sends clients to. None: anywhere, one per node at most.
    gateway_resource: str | None = None
    session_ttl_s: float = 3600.0  # a session with no stream attached is closed after this
    flush_interval_s: float = 0.005  # how often replies are flushed to clients (coalescing)
    max_events_per_s: float = 5000.0  # under load, coalesce more so messages/s stay near this
    resume_secret: str = field(default_factory=lambda: secrets.token_hex(32))
    application: str = "sinkserve"

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppSettings:
        args = dict(args or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        values: dict[str, Any] = {}
        for name, raw in args.items():
            values[name] = _coerce(fields[name].type, raw, name)
        return cls(**values)

    def engine_kwargs(self) -> dict[str, Any]:
        """The sinkcache.builder.EngineConfig fields these settings carry."""
        return {
            "model": self.model,
            "sink": self.sink,
            "window": self.window,
            "slots": self.slots,
            "kv_memory_gib": self.kv_memory_gib,
            "dtype": self.dtype,
            "device": self.device,
            "cuda_graphs": self.cuda_graphs,
            "prefill_budget": self.prefill_budget,
            "torch_threads": self.torch_threads,
            "flush_interval_s": self.flush_interval_s,
            "max_events_per_s": self.max_events_per_s,
        }


def _coerce(annotation: str, raw: Any, name: str) -> Any:
    if raw is None or not isinstance(raw, str):
        return raw
    kind = annotation.replace(" | None", "")
    if raw.lower() in ("none", "null") and "None" in annotation:
        return None
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
    except ValueError:
        raise ValueError(f"setting {name}={raw!r} is not a valid {kind}") from None
    return raw
