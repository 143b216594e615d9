"""The base seed of a test run's random draws (kernel and fused-op cases, model weights).

Fixed by default, so CI runs the same cases every time and a failure replays. Every failure names
the seed; `SINKSERVE_TEST_SEED=N` replays a run, `SINKSERVE_TEST_SEED=random` draws a fresh one
(a nightly profile that roams); either way pytest's header prints the seed in use.
"""

from __future__ import annotations

import os
import random
import zlib

SEED_ENV = "SINKSERVE_TEST_SEED"
FIXED_SEED = 515007085


def _base_seed() -> int:
    raw = os.environ.get(SEED_ENV, "").strip()
    if raw == "random":
        return random.SystemRandom().randrange(1 << 30)
    return int(raw) if raw else FIXED_SEED


BASE_SEED = _base_seed()


def seed_for(name: str) -> int:
    """A seed of its own for `name` (a parameter, a case), the same in every process: Python's
    `hash` of a string is randomised per process and could not be replayed."""
    return (BASE_SEED + zlib.crc32(name.encode())) % (1 << 31)


def replay_hint() -> str:
    return f"replay with {SEED_ENV}={BASE_SEED}"
