"""The application's resume secret: which ones an application may start with.

It keys resume tokens (deployments/resume.py) and the credential gateways show replicas
(deployments/internal.py), so every replica and gateway of an application must hold the same one,
and it must outlive restarts for tokens to stay valid. AppSettings takes it from the
`resume_secret` setting (a config file: never a command-line flag), else the environment variable
SINKSERVE_RESUME_SECRET (on Kubernetes, from a Secret), else a random one kept in this machine's
cache directory ("local"). A single-node run may use the local one; a multi-node application
refuses to start with it, and any run refuses a placeholder.
"""

from __future__ import annotations

from deployments.settings import SECRET_ENV, AppSettings

ENV_RESUME_SECRET = SECRET_ENV
MIN_SECRET_CHARS = 32
_PLACEHOLDERS = ("change-me", "changeme", "change_me", "placeholder", "example")


def is_placeholder(secret: str) -> bool:
    lowered = secret.lower()
    return any(marker in lowered for marker in _PLACEHOLDERS) or len(set(secret)) < 8


def check_resume_secret(settings: AppSettings, single_node: bool) -> None:
    """ValueError (one line) when the settings' resume secret may not be used."""
    secret = settings.resume_secret
    source = getattr(settings, "resume_secret_source", "setting")
    if is_placeholder(secret):
        raise ValueError(
            f"resume_secret is a placeholder: set {SECRET_ENV} from a Secret "
            "(e.g. `openssl rand -hex 32`)"
        )
    if single_node:
        return
    if source == "local":
        raise ValueError(
            "a multi-node application needs a resume secret shared by all its nodes: set "
            f"{SECRET_ENV} from a Kubernetes Secret (e.g. `openssl rand -hex 32`)"
        )
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(
            f"resume_secret must be at least {MIN_SECRET_CHARS} characters "
            "(e.g. `openssl rand -hex 32`)"
        )
