"""RedisSessionStore: one Redis for every replica and gateway of a cluster.

Each session is one hash, `e` (epoch), `r` (replica holding it) and `d` (the encoded record), with
a TTL refreshed by every write. The fencing check and the write run in one Lua script, so a replica
that lost a session to a claim can never overwrite the new holder's checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError, RedisError

from deployments.store.protocol import StoreUnavailableError, StoreUsage
from deployments.store.record import SessionRecord

DEFAULT_KEY_PREFIX = "sinkserve:session:"

# KEYS[1] session; ARGV epoch, replica_id, record, ttl_ms. Returns 1 written, 0 refused (stale epoch).
_PUT = """
local stored = redis.call('HGET', KEYS[1], 'e')
if stored and tonumber(stored) > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'r', ARGV[2], 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1] session; ARGV replica_id, ttl_ms. Returns {new epoch, record}, or nil when absent.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local epoch = redis.call('HINCRBY', KEYS[1], 'e', 1)
redis.call('HSET', KEYS[1], 'r', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {epoch, redis.call('HGET', KEYS[1], 'd')}
"""

# KEYS[1] session; ARGV replica_id, epoch. Returns 1 released, 0 held by someone else (or absent).
_RELEASE = """
if redis.call('HGET', KEYS[1], 'r') == ARGV[1]
    and tonumber(redis.call('HGET', KEYS[1], 'e')) == tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'r', '')
  return 1
end
return 0
"""


class RedisSessionStore:
    """Session records in Redis (`redis://` or `rediss://` URL); see `SessionStore`."""

    def __init__(
        self,
        url: str,
        ttl_s: float,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_s: float = 2.0,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._key_prefix = key_prefix
        self._address = _without_credentials(url)
        # A few quick retries ride over a dropped connection; a store that stays down is reported
        # at once so that the caller (the checkpoint writer) backs off on its own schedule.
        self._redis = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2),
        )
        self._put = self._redis.register_script(_PUT)
        self._claim = self._redis.register_script(_CLAIM)
        self._release = self._redis.register_script(_RELEASE)

    def __repr__(self) -> str:
        return f"RedisSessionStore({self._address!r}, ttl_s={self.ttl_s})"

    async def put_many(self, records: Sequence[SessionRecord]) -> list[str]:
        if not records:
            return []
        writes = [
            (self._key(record.session_id), record.epoch, record.replica_id, record.to_bytes())
            for record in records
        ]
        with self._unavailable_on_failure():
            results = await self._run_puts(writes)
            if any(isinstance(result, NoScriptError) for result in results):
                # The server lost its script cache (a restart): load the script, write again.
                await self._redis.script_load(self._put.script)
                results = await self._run_puts(writes)
        refused = []
        for record, result in zip(records, results, strict=True):
            if isinstance(result, Exception):
                raise StoreUnavailableError(f"session store {self._address}: {_one_line(result)}")
            if result == 0:
                refused.append(record.session_id)
        return refused

    async def get(self, session_id: str) -> SessionRecord | None:
        with self._unavailable_on_failure():
            epoch, replica_id, data = await self._redis.hmget(self._key(session_id), "e", "r", "d")
        if data is None:
            return None
        return dataclasses.replace(
            SessionRecord.from_bytes(data), epoch=int(epoch), replica_id=replica_id.decode()
        )

    async def claim(self, session_id: str, replica_id: str) -> SessionRecord | None:
        with self._unavailable_on_failure():
            claimed = await self._claim(
                keys=[self._key(session_id)], args=[replica_id, self._ttl_ms]
            )
        if claimed is None:
            return None
        epoch, data = claimed
        return dataclasses.replace(
            SessionRecord.from_bytes(data), epoch=int(epoch), replica_id=replica_id
        )

    async def release(self, session_id: str, replica_id: str, epoch: int) -> bool:
        with self._unavailable_on_failure():
            released = await self._release(keys=[self._key(session_id)], args=[replica_id, epoch])
        return released == 1

    async def delete(self, session_id: str) -> None:
        with self._unavailable_on_failure():
            await self._redis.delete(self._key(session_id))

    async def count(self) -> int:
        """Counts this store's keys with SCAN: linear in the keys of the database, for metrics.
        A set, because SCAN may return a key more than once."""
        with self._unavailable_on_failure():
            keys = {
                key async for key in self._redis.scan_iter(match=f"{self._key_prefix}*", count=1000)
            }
        return len(keys)

    async def usage(self) -> StoreUsage:
        """Keys by SCAN, bytes by MEMORY USAGE of each (one pipelined round trip): linear in the
        keys, for Stats. Every key has a TTL (each write sets it), so Redis expires them."""
        with self._unavailable_on_failure():
            keys = {
                key async for key in self._redis.scan_iter(match=f"{self._key_prefix}*", count=1000)
            }
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.memory_usage(key)
                sizes = await pipe.execute(raise_on_error=False)
        used = sum(size for size in sizes if isinstance(size, int))
        return StoreUsage(live=len(keys), rows=len(keys), bytes=used)

    async def expire_due(self, every_s: float) -> int | None:
        return None  # Redis expires every key by its TTL

    async def close(self) -> None:
        await self._redis.aclose()

    async def _run_puts(self, writes: list[tuple[str, int, str, bytes]]) -> list[Any]:
        """One pipeline, one round trip: EVALSHA per record (each script runs atomically)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, epoch, replica_id, data in writes:
                pipe.evalsha(self._put.sha, 1, key, epoch, replica_id, data, self._ttl_ms)
            return await pipe.execute(raise_on_error=False)

    def _key(self, session_id: str) -> str:
        return self._key_prefix + session_id

    @contextmanager
    def _unavailable_on_failure(self) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as error:
            raise StoreUnavailableError(
                f"session store {self._address}: {_one_line(error)}"
            ) from None


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
