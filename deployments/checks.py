"""Checks before deploying: settings that cannot work, a model spec that names nothing, a port that
is taken. Each refuses with one line, in seconds, instead of replicas failing one by one after Ray
has started (Serve retries a failing constructor three times).

`build_app` runs them (so `serve run` refuses early too) and `sinkserve serve` runs them before
`ray.init`. Checks that depend on the machine (model files, the port) only run where the service
will run: for a local cluster, not when the app is built on a KubeRay head pod whose workers may
mount models this pod does not.
"""

from __future__ import annotations

import errno
import os
import socket

import click

from deployments.settings import AppSettings
from sinkcache.models.spec import check_model_spec


class SettingsError(ValueError, click.ClickException):
    """Settings that cannot work. A ValueError for Python callers; a ClickException so that Ray's
    `serve run` CLI (click) prints `Error: <the line>` and exits 2 instead of a traceback."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)
        click.ClickException.__init__(self, message)

    def __str__(self) -> str:
        return self.message


def check_settings(settings: AppSettings, local: bool) -> None:
    """Every value, the model spec, and on a local cluster the model's files and the port."""
    try:
        settings.validate()
        check_model_spec(settings.engine.model, files=local)
        if local:
            check_port_free(settings.listen_host, settings.port, "port")
            if settings.openai_port:
                check_port_free(settings.listen_host, settings.openai_port, "openai_port")
            if settings.metrics_export_port:
                check_port_free("0.0.0.0", settings.metrics_export_port, "metrics_export_port")
    except SettingsError:
        raise
    except ValueError as error:
        raise SettingsError(str(error)) from None


def building_for_a_local_cluster() -> bool:
    """True when `build_app` runs in `serve run` before it starts a local Ray (no Ray yet, no
    RAY_ADDRESS): the gateway will listen on this machine, and the replicas read its files."""
    import ray

    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")


def check_port_free(host: str, port: int, name: str) -> None:
    """Bind `host:port` as the gRPC server will (SO_REUSEADDR, no SO_REUSEPORT) and let go."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise SettingsError(f"{name}: cannot resolve host {host!r}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            reason = (
                "is in use"
                if error.errno == errno.EADDRINUSE
                else f"cannot be bound ({error.strerror})"
            )
            raise SettingsError(
                f"{name} {port} on {host} {reason}: stop what listens there or choose another "
                f"--{name.replace('_', '-')}"
            ) from None
