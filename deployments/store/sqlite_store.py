"""SqliteSessionStore: the embedded default, one WAL file shared by every process on a machine.

The replicas of one `sinkserve serve` open the same file, so a session checkpointed by a replica
that dies can be rebuilt by another, and all of them survive a restart of the whole service. Each
store keeps one connection on one worker thread: sqlite3 connections are not for sharing across
threads, and the event loop must never wait on the disk or on another process's write lock.

The file stays bounded: expired rows are deleted by one sweep per period for the whole file
(`expire_due`: the `upkeep` row says when the last one ran, and whichever process finds it due
takes it in the same transaction), their pages are reused or handed back (incremental vacuum on a
file made with it), and the WAL is checkpointed and truncated after each sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from deployments.store.protocol import StoreUnavailableError, StoreUsage
from deployments.store.record import SessionRecord

_Result = TypeVar("_Result")
logger = logging.getLogger(__name__)

# `epoch` and `replica_id` are authoritative over the copies inside `record`: a claim changes them
# without rewriting the record. `written_at` is the store's own clock, the base of the TTL.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    replica_id TEXT NOT NULL,
    written_at REAL NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_written_at ON sessions (written_at);
CREATE TABLE IF NOT EXISTS upkeep (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    swept_at REAL NOT NULL
);
INSERT OR IGNORE INTO upkeep (id, swept_at) VALUES (0, 0);
"""
# A checkpoint that resets the WAL also truncates it to this size.
_WAL_LIMIT_BYTES = 4 * 1024 * 1024
CHECKPOINT_WAIT_MS = 200  # how long a sweep's WAL truncation waits for the file's other users

# A stored row of a higher epoch is kept (fencing) unless it has expired, which counts as absent.
_PUT = """
INSERT INTO sessions (session_id, epoch, replica_id, written_at, record)
VALUES (:session_id, :epoch, :replica_id, :now, :record)
ON CONFLICT (session_id) DO UPDATE SET
    epoch = excluded.epoch,
    replica_id = excluded.replica_id,
    written_at = excluded.written_at,
    record = excluded.record
WHERE excluded.epoch >= sessions.epoch OR sessions.written_at <= :cutoff
"""


class SqliteSessionStore:
    """Session records in a SQLite file (WAL, synchronous=NORMAL); see `SessionStore`."""

    def __init__(self, path: str | Path, ttl_s: float, busy_timeout_s: float = 5.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.path = Path(path)
        self.ttl_s = ttl_s
        self._busy_timeout_s = busy_timeout_s
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-store-sqlite")
        self._connection: sqlite3.Connection | None = None  # opened and used on the worker only
        self._closed = False

    def __repr__(self) -> str:
        return f"SqliteSessionStore({str(self.path)!r}, ttl_s={self.ttl_s})"

    async def put_many(self, records: Sequence[SessionRecord]) -> list[str]:
        if not records:
            return []
        rows = [
            {
                "session_id": record.session_id,
                "epoch": record.epoch,
                "replica_id": record.replica_id,
                "record": record.to_bytes(),
            }
            for record in records
        ]

        def write(connection: sqlite3.Connection) -> list[str]:
            now = time.time()
            refused = []
            with _write_transaction(connection):
                for row in rows:
                    cursor = connection.execute(
                        _PUT, {**row, "now": now, "cutoff": now - self.ttl_s}
                    )
                    if cursor.rowcount == 0:
                        refused.append(row["session_id"])
            return refused

        return await self._on_worker(write)

    async def get(self, session_id: str) -> SessionRecord | None:
        def read(connection: sqlite3.Connection) -> SessionRecord | None:
            return _select_live(connection, session_id, time.time() - self.ttl_s)

        return await self._on_worker(read)

    async def claim(self, session_id: str, replica_id: str) -> SessionRecord | None:
        def take(connection: sqlite3.Connection) -> SessionRecord | None:
            now = time.time()
            with _write_transaction(connection):
                cursor = connection.execute(
                    "UPDATE sessions SET epoch = epoch + 1, replica_id = ?, written_at = ?"
                    " WHERE session_id = ? AND written_at > ?",
                    (replica_id, now, session_id, now - self.ttl_s),
                )
                if cursor.rowcount == 0:
                    return None
                return _select_live(connection, session_id, now - self.ttl_s)

        return await self._on_worker(take)

    async def release(self, session_id: str, replica_id: str, epoch: int) -> bool:
        def let_go(connection: sqlite3.Connection) -> bool:
            with _write_transaction(connection):
                cursor = connection.execute(
                    "UPDATE sessions SET replica_id = ''"
                    " WHERE session_id = ? AND replica_id = ? AND epoch = ? AND written_at > ?",
                    (session_id, replica_id, epoch, time.time() - self.ttl_s),
                )
            return cursor.rowcount > 0

        return await self._on_worker(let_go)

    async def delete(self, session_id: str) -> None:
        def remove(connection: sqlite3.Connection) -> None:
            with _write_transaction(connection):
                connection.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))

        await self._on_worker(remove)

    async def count(self) -> int:
        def count_live(connection: sqlite3.Connection) -> int:
            cursor = connection.execute(
                "SELECT count(*) FROM sessions WHERE written_at > ?", (time.time() - self.ttl_s,)
            )
            return cursor.fetchone()[0]

        return await self._on_worker(count_live)

    async def expire(self) -> int:
        """Delete expired rows now (reads already ignore them; this keeps the file small), then
        give their pages back and truncate the WAL. Returns how many."""
        return await self._on_worker(self._sweep)

    async def expire_due(self, every_s: float) -> int | None:
        return await self._on_worker(lambda connection: self._sweep(connection, every_s))

    async def usage(self) -> StoreUsage:
        def measure(connection: sqlite3.Connection) -> StoreUsage:
            live, rows = connection.execute(
                "SELECT count(*) FILTER (WHERE written_at > ?), count(*) FROM sessions",
                (time.time() - self.ttl_s,),
            ).fetchone()
            size = 0
            for path in (self.path, self.path.with_name(self.path.name + "-wal")):
                with contextlib.suppress(FileNotFoundError):
                    size += os.stat(path).st_size
            return StoreUsage(live=live, rows=rows, bytes=size)

        return await self._on_worker(measure)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close_connection() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        # Queued behind every call already submitted: they finish first.
        await asyncio.get_running_loop().run_in_executor(self._worker, close_connection)
        self._worker.shutdown(wait=False)

    async def _on_worker(self, work: Callable[[sqlite3.Connection], _Result]) -> _Result:
        if self._closed:
            raise StoreUnavailableError(f"session store {self.path} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._worker, self._with_connection, work
            )
        except (sqlite3.Error, OSError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise StoreUnavailableError(f"session store {self.path}: {message}") from None

    def _sweep(self, connection: sqlite3.Connection, every_s: float | None = None) -> int | None:
        """Delete rows past the TTL; with `every_s`, only when no process has swept the file
        within it (the `upkeep` row is taken in the same transaction, so two processes never
        both sweep). Then free pages go back (incremental vacuum) and the WAL is checkpointed and
        truncated."""
        now = time.time()
        with _write_transaction(connection):
            if every_s is not None:
                due = connection.execute(
                    "UPDATE upkeep SET swept_at = ? WHERE id = 0 AND"
                    " (swept_at <= ? OR swept_at > ?)",  # the second: the clock went back
                    (now, now - every_s, now + every_s),
                )
                if due.rowcount == 0:
                    return None
            removed = connection.execute(
                "DELETE FROM sessions WHERE written_at <= ?", (now - self.ttl_s,)
            ).rowcount
        if removed:
            connection.execute("PRAGMA incremental_vacuum").fetchall()
        # TRUNCATE waits for every reader and writer of the file: briefly, since this worker's
        # checkpoint writes queue behind it. A busy answer only means the WAL is truncated at a
        # later sweep (journal_size_limit bounds it meanwhile).
        connection.execute(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")
        try:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            connection.execute(f"PRAGMA busy_timeout = {round(self._busy_timeout_s * 1000)}")
        return removed

    def _with_connection(self, work: Callable[[sqlite3.Connection], _Result]) -> _Result:
        if self._connection is None:
            self._connection = _connect(self.path, self._busy_timeout_s)
        return work(self._connection)


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # timeout: sqlite's busy timeout, how long a write waits for another process's write lock.
    # isolation_level=None: no implicit transactions; writes open BEGIN IMMEDIATE themselves.
    connection = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    deadline = time.monotonic() + busy_timeout_s
    try:
        while True:
            try:
                _set_up(connection, path)
                return connection
            except sqlite3.OperationalError as error:
                # A backstop, not a proven cause: CI once saw "database is locked" when two
                # processes opened one new file together, and some SQLITE_BUSY cases skip the
                # busy handler (e.g. while another connection recovers the WAL). Locks that
                # merely wait (tested by holding one) go through the busy timeout anyway.
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    except BaseException:
        connection.close()
        raise


def _set_up(connection: sqlite3.Connection, path: Path) -> None:
    # Only takes on a new file (before its first table): expired rows' pages can then be handed
    # back to the filesystem. An older file reuses them for new rows instead.
    connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
    (journal_mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
    if journal_mode != "wal":  # e.g. a network filesystem: still correct, readers then wait
        logger.warning("session store %s: journal_mode is %s, not wal", path, journal_mode)
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT_BYTES}")
    # Table and index in one transaction that takes the write lock up front (as
    # _write_transaction does), so a second process never sees one without the other.
    connection.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")


@contextmanager
def _write_transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE takes the write lock up front, so waiting for another process goes through
    the busy timeout; a deferred transaction upgrading to a write could fail at once instead."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    finally:
        if connection.in_transaction:
            connection.execute("ROLLBACK")


def _select_live(
    connection: sqlite3.Connection, session_id: str, cutoff: float
) -> SessionRecord | None:
    row = connection.execute(
        "SELECT epoch, replica_id, record FROM sessions WHERE session_id = ? AND written_at > ?",
        (session_id, cutoff),
    ).fetchone()
    if row is None:
        return None
    epoch, replica_id, data = row
    return dataclasses.replace(SessionRecord.from_bytes(data), epoch=epoch, replica_id=replica_id)
