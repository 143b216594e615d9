"""CheckpointWriter: write-behind of session records for one replica.

A replica checkpoints a session at every turn end and during long replies; those writes must never
slow a step or fail a request. `submit` only replaces the session's pending record (so a session
costs at most one pending record however often it is checkpointed), and a background task writes
everything pending with one `put_many` per flush. When the store is down the records wait, newer
ones still replacing older, and the task retries with capped exponential backoff until it returns.

Group commit: `until_written(session_id)` waits until the session's newest record is in the store
(the flush that carries it), so a replica can send a turn's end only once that turn is durable.
Many sessions' waits ride on one flush: latency of at most one flush interval plus two writes (the
one in flight and the one that carries the record), and no extra writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from deployments.store.protocol import SessionStore, StoreUnavailableError
from deployments.store.record import SessionRecord

logger = logging.getLogger(__name__)


class CheckpointWriter:
    """Coalescing, batching, retrying writer in front of a `SessionStore`. Use it from the event
    loop's thread; it never raises into its caller."""

    def __init__(
        self,
        store: SessionStore,
        interval_s: float = 0.05,
        on_refused: Callable[[list[str]], None] | None = None,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 2.0,
    ) -> None:
        self.store = store
        self.interval_s = interval_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.on_refused = on_refused  # called with the ids another replica has claimed since
        self.failures = 0  # failed flushes since start
        self.last_error = ""  # the newest failure's message, kept after the store returns
        self.flushes = 0  # successful flushes, one put_many each
        self.written = 0  # records written (refused ones not counted)
        self._pending: dict[str, SessionRecord] = {}
        self._in_flight: dict[str, SessionRecord] = {}
        self._forgotten_in_flight: set[str] = set()
        # Resolved when the flush that carries the records pending now (or in flight now) ends:
        # True when they were written, False when the write failed. Made only when awaited.
        self._next_written: asyncio.Future[bool] | None = None
        self._in_flight_written: asyncio.Future[bool] | None = None
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff_s = 0.0
        self._failing = False

    @property
    def pending(self) -> int:
        """Sessions whose newest record is not in the store yet."""
        return len(self._pending.keys() | self._in_flight.keys())

    @property
    def running(self) -> bool:
        """The background task is alive (it only ends through `stop`)."""
        return self._task is not None and not self._task.done()

    def submit(self, record: SessionRecord) -> None:
        self._pending[record.session_id] = record
        self._wake.set()

    def forget(self, session_id: str) -> None:
        """Drop the session's pending record (it was closed). A write of it already in flight may
        still land: await `wait_for_in_flight()` before deleting the session from the store."""
        self._pending.pop(session_id, None)
        if session_id in self._in_flight:
            self._forgotten_in_flight.add(session_id)
        self._wake.set()  # a wait on a flush that now has nothing to write ends

    async def until_written(self, session_id: str) -> bool:
        """Wait until the newest record submitted for the session is in the store: True once it
        is (or nothing of it is waiting), False when the write carrying it failed (the store is
        down: the record stays pending and is retried; while it is down nobody waits for it)."""
        if session_id in self._pending:
            if self._failing or not self.running:  # the store is down: do not hold callers up
                return False
            if self._next_written is None:
                self._next_written = asyncio.get_running_loop().create_future()
            return await asyncio.shield(self._next_written)
        if session_id in self._in_flight and self._in_flight_written is not None:
            return await asyncio.shield(self._in_flight_written)
        return True

    async def wait_for_in_flight(self) -> None:
        """Return once the write in flight now, if any, has finished (succeeded or failed)."""
        async with self._flush_lock:
            pass

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="checkpoint-writer"
            )

    async def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the background task and flush what is pending; True when all of it was written."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        try:
            return await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            return False
        finally:
            _resolve(self._next_written, False)  # nothing flushes any more: nobody waits on it
            self._next_written = None

    async def flush(self) -> bool:
        """Write everything pending now (at drain); True when nothing is left pending."""
        async with self._flush_lock:
            if self._pending:
                await self._write_pending()
            return not self._pending

    async def _run(self) -> None:
        while True:
            if not self._pending:
                _resolve(self._next_written, True)  # what they waited for was forgotten
                self._next_written = None
                self._wake.clear()
                await self._wake.wait()
                continue
            async with self._flush_lock:
                written = await self._write_pending() if self._pending else True
            if written:
                self._backoff_s = 0.0
                await asyncio.sleep(self.interval_s)
            else:
                self._backoff_s = min(
                    self.backoff_max_s, max(self.backoff_min_s, self._backoff_s * 2)
                )
                await asyncio.sleep(self._backoff_s)

    async def _write_pending(self) -> bool:
        """One put_many of everything pending. On failure the records go back to pending unless a
        newer record for the same session arrived meanwhile or the session was forgotten."""
        batch, self._pending = self._pending, {}
        self._in_flight = batch
        done, self._next_written = self._next_written, None
        if done is None:
            done = asyncio.get_running_loop().create_future()
        self._in_flight_written = done
        written = False
        try:
            refused = await self.store.put_many(list(batch.values()))
            written = True
        except StoreUnavailableError as error:
            self._note_failure(str(error))
        except Exception as error:  # a bug must not stop checkpoints nor reach the replica
            self._note_failure(f"{type(error).__name__}: {error}")
            batch = {session_id: record for session_id, record in batch.items() if _encodes(record)}
        finally:
            forgotten, self._forgotten_in_flight = self._forgotten_in_flight, set()
            self._in_flight = {}
            self._in_flight_written = None
            _resolve(done, written)
            if not written:
                for session_id, record in batch.items():
                    if session_id not in forgotten:
                        self._pending.setdefault(session_id, record)
        if not written:
            return False
        if self._failing:
            self._failing = False
            logger.info("session store is back; checkpoints caught up")
        self.flushes += 1
        self.written += len(batch) - len(refused)
        if refused and self.on_refused is not None:
            try:
                self.on_refused(refused)
            except Exception:
                logger.exception("on_refused callback failed")
        return True

    def _note_failure(self, message: str) -> None:
        if not self._failing:
            self._failing = True
            logger.warning("checkpoint flush failed, records kept for retry: %s", message)
        self.failures += 1
        self.last_error = message


def _resolve(future: asyncio.Future[bool] | None, written: bool) -> None:
    if future is not None and not future.done():
        future.set_result(written)


def _encodes(record: SessionRecord) -> bool:
    try:
        record.to_bytes()
    except ValueError:
        logger.error("dropping a checkpoint that cannot be encoded: session %s", record.session_id)
        return False
    return True
