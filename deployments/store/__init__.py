"""Durable session state: a StreamingLLM session is a few KB of token ids, so it can outlive any
process. Torch-free and Ray-free: replicas, gateways and tools all import it."""

from deployments.store.protocol import SessionStore, StoreUnavailableError, StoreUsage
from deployments.store.record import RECORD_VERSION, SessionRecord
from deployments.store.redis_store import RedisSessionStore
from deployments.store.sqlite_store import SqliteSessionStore
from deployments.store.upkeep import StoreUpkeep, sweep_period_s
from deployments.store.url import default_sqlite_url, open_store
from deployments.store.writer import CheckpointWriter

__all__ = [
    "RECORD_VERSION",
    "CheckpointWriter",
    "RedisSessionStore",
    "SessionRecord",
    "SessionStore",
    "SqliteSessionStore",
    "StoreUnavailableError",
    "StoreUpkeep",
    "StoreUsage",
    "default_sqlite_url",
    "open_store",
    "sweep_period_s",
]
