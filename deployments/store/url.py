"""open_store: one `session_store` setting string to a store backend."""

from __future__ import annotations

import os
from pathlib import Path

from deployments.store.protocol import SessionStore
from deployments.store.redis_store import RedisSessionStore
from deployments.store.sqlite_store import SqliteSessionStore

CACHE_ENV = "SINKSERVE_CACHE"
SQLITE_SCHEME = "sqlite://"
REDIS_SCHEMES = ("redis://", "rediss://")


def default_sqlite_url() -> str:
    """The embedded default: `sessions.db` under the cache root that sinkcache also uses."""
    cache_root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sinkserve")
    return f"{SQLITE_SCHEME}{(cache_root / 'sessions.db').expanduser().resolve()}"


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
