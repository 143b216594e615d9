"""Where a service keeps its own state on this machine: the SQLite session store (`sessions.db`)
and the made-up resume secret (`resume_secret`).

By default that is the cache directory (`$SINKSERVE_CACHE`, else `~/.cache/sinkserve`), beside the
model files. `$SINKSERVE_STATE_DIR` moves only the state: runs that must not share sessions or
tokens (tests, two local services) each get their own, while all of them share the downloaded and
converted model files, which take a minute to build.
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "SINKSERVE_STATE_DIR"
CACHE_ENV = "SINKSERVE_CACHE"


def state_dir() -> Path:
    """`$SINKSERVE_STATE_DIR`, else `$SINKSERVE_CACHE`, else `~/.cache/sinkserve` (not created)."""
    configured = os.environ.get(STATE_ENV) or os.environ.get(CACHE_ENV)
    root = Path(configured) if configured else Path.home() / ".cache" / "sinkserve"
    return root.expanduser()
