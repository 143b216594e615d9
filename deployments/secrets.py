"""The application's resume secret: where it comes from, and when a run may make one up.

It keys resume tokens (deployments/resume.py) and the credential gateways show replicas
(deployments/internal.py), so every replica and gateway of an application must hold the same one,
and it must outlive restarts for tokens to stay valid. It comes from the `resume_secret` setting
(a config file: never a command-line flag) or the environment variable SINKSERVE_RESUME_SECRET
(on Kubernetes, from a Secret). A single-node run may go without: it gets a random one. A
multi-node application refuses to start without it, and any run refuses a placeholder.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

ENV_RESUME_SECRET = "SINKSERVE_RESUME_SECRET"
MIN_SECRET_CHARS = 32
_PLACEHOLDERS = ("change-me", "changeme", "change_me", "placeholder", "example", "secret")


def is_placeholder(secret: str) -> bool:
    lowered = secret.lower()
    return any(marker in lowered for marker in _PLACEHOLDERS) or len(set(secret)) < 8


def resolve_resume_secret(configured: str, single_node: bool) -> str:
    """The secret to run with; ValueError (one line) when there is none that may be used."""
    secret = configured or os.environ.get(ENV_RESUME_SECRET, "")
    if secret:
        if is_placeholder(secret):
            raise ValueError(
                "resume_secret is a placeholder: set SINKSERVE_RESUME_SECRET from a Secret "
                "(e.g. `openssl rand -hex 32`)"
            )
        if not single_node and len(secret) < MIN_SECRET_CHARS:
            raise ValueError(
                f"resume_secret must be at least {MIN_SECRET_CHARS} characters "
                "(e.g. `openssl rand -hex 32`)"
            )
        return secret
    if not single_node:
        raise ValueError(
            "a multi-node application needs a resume secret shared by all its nodes: set "
            "SINKSERVE_RESUME_SECRET from a Kubernetes Secret (e.g. `openssl rand -hex 32`)"
        )
    return secrets.token_hex(32)


def local_resume_secret() -> str:
    """The secret for separate processes of one user on one machine (deployments.standalone):
    SINKSERVE_RESUME_SECRET, else a random one kept in ~/.cache/sinkserve/resume_secret (0600)."""
    if secret := os.environ.get(ENV_RESUME_SECRET):
        return resolve_resume_secret(secret, single_node=True)
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sinkserve"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    file = path / "resume_secret"
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return file.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    log.info("made a local resume secret in %s", file)
    return file.read_text().strip()
