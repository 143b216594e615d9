"""open_store: one `session_store` setting string to a store backend."""

from __future__ import annotations

from pathlib import Path

from deployments.state_dir import state_dir
from deployments.store.protocol import SessionStore
from deployments.store.redis_store import RedisSessionStore
from deployments.store.sqlite_store import SqliteSessionStore

SQLITE_SCHEME = "sqlite://"
REDIS_SCHEMES = ("redis://", "rediss://")


def default_sqlite_url() -> str:
    """The embedded default: `sessions.db` in the state directory (deployments/state_dir.py)."""
    return f"{SQLITE_SCHEME}{(state_dir() / 'sessions.db').resolve()}"


def open_store(url: str, ttl_s: float) -> SessionStore:
    """`redis://host:port/db`, `rediss://...`, `sqlite:///abs/path.db`, or a plain file path
    (SQLite). Nothing connects here: the first call does, and reports a failure as
    `StoreUnavailableError`."""
    if url.startswith(REDIS_SCHEMES):
        return RedisSessionStore(url, ttl_s)
    if url.startswith(SQLITE_SCHEME):
        path = url[len(SQLITE_SCHEME) :]
        if not path.startswith("/"):
            raise ValueError(
                f"session store {url!r}: a sqlite URL takes an absolute path, sqlite:///abs/path.db"
            )
        return SqliteSessionStore(path, ttl_s)
    if url and "://" not in url:
        return SqliteSessionStore(Path(url).expanduser().resolve(), ttl_s)
    raise ValueError(
        f"session store {url!r}: expected redis://host:port/db, rediss://host:port/db,"
        " sqlite:///abs/path.db or a file path"
    )
