"""AppSettings: everything the Serve application is configured with, each setting declared once.

The engine's settings are `sinkcache.config.EngineConfig`, nested here as `engine`; the rest are
the service's. `serve run deployments.app:build_app key=value ...`, KubeRay's serveConfigV2 `args:`,
a YAML file (`sinkserve serve --config`) and the CLI's options all name settings by their flat field
names (`model`, `window`, `replicas`, ...); `from_args` routes each to where it is declared,
coerces strings, and refuses unknown keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import secrets
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from deployments.state_dir import state_dir
from sinkcache.config import EngineConfig, setting
from sinkwire.options import DEFAULT_MAX_MESSAGE_BYTES

ENV_API_KEYS = "SINKSERVE_API_KEYS"  # the keys file's content (deployments/auth.py)

STORE_ENV = "SINKSERVE_SESSION_STORE"
SECRET_ENV = "SINKSERVE_RESUME_SECRET"


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
    host: str | None = setting(
        None,
        "the gateway's listen address; default 127.0.0.1, or 0.0.0.0 (every interface) when "
        "clients must authenticate (API keys or client certificates)",
    )
    port: int = setting(50051, "the gateway's public gRPC port")
    openai_port: int = setting(
        8100,
        "the gateway's OpenAI-compatible HTTP port (/v1/responses, /v1/chat/completions), on the "
        "same address, keys and TLS as the gRPC port; 0: off",
    )
    metrics_export_port: int | None = setting(
        None,
        "Prometheus port of the local Ray cluster `sinkserve serve` starts (default: a free "
        "port, printed with the ready line); on a cluster, Ray's own --metrics-export-port",
    )
    insecure: bool = setting(
        False,
        "serve without API keys on an address other than loopback (anyone who can reach it may "
        "use it)",
    )
    api_keys: str | None = setting(
        None,
        "file of hashed API keys, one per line with optional name=, max_sessions=, "
        "tokens_per_s=, admin (`sinkserve api-key` makes them); or SINKSERVE_API_KEYS",
    )
    tls_cert: str | None = setting(None, "PEM certificate chain of the gateway port (TLS)")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = setting(
        None, "PEM CA bundle: require client certificates it signed (mTLS)"
    )
    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES,
        "largest client message taken (serialized bytes); larger ends the stream with "
        "RESOURCE_EXHAUSTED",
    )
    max_buffered_tokens: int = setting(
        512,
        "reply tokens a stream may have waiting for a slow reader before its session stops "
        "generating (backpressure)",
    )
    quota_burst_s: float = setting(
        10.0, "seconds of an API key's tokens_per_s it may use at once (the bucket's depth)"
    )
    gateways: int = setting(
        2, "gateways, at most max_gateways_per_node on a node (on Kubernetes: one per gateway pod)"
    )
    gateway_resource: str | None = setting(
        None,
        "place gateways only on Ray nodes offering this custom resource (on Kubernetes: the pods "
        "a Service sends clients to)",
    )
    session_ttl_s: float = setting(3600.0, "seconds a session with no stream attached lives")
    session_store: str = setting(
        "",
        "where sessions are checkpointed so they outlive any process: sqlite (a file in the "
        "state directory), sqlite:///PATH, redis://HOST:PORT/DB, or off; default: "
        f"${STORE_ENV}, else sqlite",
    )
    durable_turn_ends: bool = setting(
        True,
        "send a TurnEnd only once its session's checkpoint is in the session store (waits for "
        "the store writer's next flush: at most its 50 ms interval plus two writes), so a turn the "
        "client saw end survives a crash; off: sent at once, and a crash may lose it",
    )
    idle_offload_s: float = setting(
        60.0,
        "seconds a session with no stream and no request keeps its cache slot; then it leaves "
        "the GPU and its next message rebuilds it",
    )
    min_replicas: int | None = setting(
        None, "autoscale between min_replicas and max_replicas (both set) on slot occupancy"
    )
    max_replicas: int | None = setting(None, "see min_replicas")
    target_slot_occupancy: float = setting(
        0.75, "autoscaling keeps the sessions with a cache slot near this share of all slots"
    )
    drain_timeout_s: float = setting(
        30.0,
        "on shutdown or scale-in, how long a replica lets replies in flight finish before it "
        "cancels them, checkpoints every session and stops",
    )
    max_gateways_per_node: int = setting(
        2, "gateways sharing one node's port (SO_REUSEPORT), so one dying does not close it"
    )
    resume_secret: str = setting(
        "",
        "HMAC key of resume tokens and of the gateways' credential, shared by the whole app; a "
        f"config file or ${SECRET_ENV} (a Kubernetes Secret), never a flag; default on one node: "
        "a random key kept in the state directory (so a restarted service accepts old tokens)",
    )
    application: str = setting("sinkserve", "the Serve application's name")

    def __post_init__(self) -> None:
        # Where the resume secret came from: "setting", "env", or "local" (made up on this
        # machine, which only a single-node app may use: deployments/secrets.py).
        self.resume_secret_source = "setting"
        if not self.resume_secret:
            self.resume_secret = os.environ.get(SECRET_ENV, "")
            self.resume_secret_source = "env"
        if not self.resume_secret:
            self.resume_secret = _local_secret()
            self.resume_secret_source = "local"
        if not self.session_store:
            self.session_store = os.environ.get(STORE_ENV) or "sqlite"

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None and self.max_replicas is not None

    def store_url(self) -> str | None:
        """The session store's URL (None: no store)."""
        if self.session_store in ("off", "none"):
            return None
        if self.session_store == "sqlite":
            from deployments.store import default_sqlite_url

            return default_sqlite_url()
        return self.session_store

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
        if not 0 <= self.openai_port < 65536 or self.openai_port == self.port:
            problems.append(
                f"openai_port must be in 0..65535 (0: off) and differ from port, got "
                f"{self.openai_port}"
            )
        if self.metrics_export_port is not None and not 0 < self.metrics_export_port < 65536:
            problems.append(
                f"metrics_export_port must be in 1..65535, got {self.metrics_export_port}"
            )
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            problems.append(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        if not self.session_ttl_s > 0:
            problems.append(f"session_ttl_s must be > 0, got {self.session_ttl_s}")
        if not self.idle_offload_s > 0:
            problems.append(f"idle_offload_s must be > 0, got {self.idle_offload_s}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            problems.append("set both min_replicas and max_replicas to autoscale, or neither")
        elif self.autoscaling and not 0 <= self.min_replicas <= self.max_replicas:
            problems.append(
                f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, "
                f"{self.max_replicas}"
            )
        if not 0 < self.target_slot_occupancy <= 1:
            problems.append(
                f"target_slot_occupancy must be in (0, 1], got {self.target_slot_occupancy}"
            )
        if self.max_gateways_per_node < 1:
            problems.append(f"max_gateways_per_node must be >= 1, got {self.max_gateways_per_node}")
        store = self.session_store
        if not (
            store in ("off", "none", "sqlite")
            or store.startswith(("sqlite://", "redis://", "rediss://", "/"))
        ):
            problems.append(
                f"session_store must be sqlite, sqlite:///PATH, redis://..., or off; got {store!r}"
            )
        problems += self._security_problems()
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def authenticates(self) -> bool:
        """Whether clients must prove who they are (API keys, or mTLS client certificates)."""
        return bool(self.api_keys or os.environ.get(ENV_API_KEYS, "").strip() or self.tls_client_ca)

    @property
    def listen_host(self) -> str:
        """The gateway's listen address: `host`, else loopback unless clients authenticate."""
        if self.host:
            return self.host
        return "0.0.0.0" if self.authenticates else "127.0.0.1"

    def _security_problems(self) -> list[str]:
        problems = []
        if not (self.authenticates or self.insecure or _is_loopback(self.listen_host)):
            problems.append(
                f"the gateway would listen on {self.listen_host} with no API keys: give "
                "--api-keys FILE (or SINKSERVE_API_KEYS), or --insecure to serve anyone who can "
                "reach it"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mTLS) needs tls_cert and tls_key")
        for name in ("api_keys", "tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                problems.append(f"{name}: no such file {path}")
        if self.max_message_bytes < 1024:
            problems.append(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_buffered_tokens < 1:
            problems.append(f"max_buffered_tokens must be >= 1, got {self.max_buffered_tokens}")
        if not self.quota_burst_s > 0:
            problems.append(f"quota_burst_s must be > 0, got {self.quota_burst_s}")
        return problems


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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


def _local_secret() -> str:
    """A random resume secret kept (mode 0600) in the state directory, made on first use."""
    path = state_dir() / "resume_secret"
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(fresh)
    return fresh
