"""ReplicaSessions: the life of one replica's sessions, apart from the gRPC that carries them.

A session is attached to at most one stream. It is *resident* (in the engine, holding a cache slot)
or *offloaded* (its snapshot kept here, its slot free): a session with no stream and no request
for `idle_offload_s` leaves the GPU, and when every slot is taken the least recently active idle
session makes room. Its next message rebuilds it (`Engine.restore_session`), so a replica holds
more sessions than it has slots.

Admission follows the capacity to *generate*, not to hold: a session in a conversation (a turn
in flight, or its last turn ended less than `CONVERSING_S` ago, its stream still attached) keeps
its slot. When every slot holds one, a new Open is refused at once (RESOURCE_EXHAUSTED with a
retry hint), and a turn that needs its offloaded session rebuilt waits in a bounded first-come
queue. Evicting conversing sessions instead made every turn a rebuild: the service spent its
steps re-prefilling windows and starved everyone.

With a session store (deployments.store), every turn end and every window/2 reply tokens of every
session is checkpointed there, write-behind, in one round trip per flush. A Resume for a session
this replica does not know claims it in the store (fencing off its previous holder) and rebuilds
it: that is how sessions outlive a replica crash, an engine crash, a drain, or a restart of the
whole service. What can be lost is the tail of a reply generated after its last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from deployments.resume import check_resume
from deployments.settings import AppSettings
from deployments.store import CheckpointWriter, SessionRecord, SessionStore, StoreUnavailableError
from sinkcache.errors import (
    ArenaFullError,
    EngineStoppedError,
    InvalidRequestError,
    SessionExistsError,
    SessionNotFoundError,
)
from sinkcache.events import SessionSnapshot
from sinkcache.host.protocol import Engine, SessionInfo
from sinkwire.session_ids import new_session_id
from sinkwire.status import StreamError

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a rebuild waits for a slot when every slot holds a session in a conversation (replies
# end and conversations pause, and a slot with them); a new session is refused at once instead.
REBUILD_WAIT_S = 10.0
# Rebuilds waiting for a slot at most; one more is refused at once (with a retry hint).
MAX_QUEUED_REBUILDS = 64
# A session whose last turn ended this recently (its stream attached) is in a conversation: it
# keeps its slot. Longer pauses than this cost one rebuild at the next turn, not a slot held idle.
CONVERSING_S = 5.0


@dataclass(eq=False)
class SessionEntry:
    """What this replica knows of one of its sessions."""

    session_id: str
    owner: str
    epoch: int  # the store's fencing epoch this replica holds it at
    stream: asyncio.Queue | None = None  # the attached stream's outbox
    # monotonic; None while a stream is attached. A new entry counts as detached until its
    # stream attaches, so one whose stream went away first still expires.
    detached_since: float | None = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    inflight: int = 0  # appends sent to the engine whose turn has not ended
    turn_ended_at: float | None = None  # monotonic; the end of its last turn
    snapshot: SessionSnapshot | None = None  # set while offloaded (not resident)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def resident(self) -> bool:
        return self.snapshot is None

    def conversing_until(self) -> float | None:
        """Until when (monotonic) the session keeps its slot against others that need one: None
        if it is idle now; +inf while a turn is in flight."""
        if self.inflight:
            return float("inf")
        if self.stream is None or self.turn_ended_at is None:
            return None
        until = self.turn_ended_at + CONVERSING_S
        return until if until > time.monotonic() else None


@dataclass(frozen=True)
class Attached:
    info: SessionInfo
    resumed: bool
    rebuilt: bool  # rebuilt from a checkpoint: reply tokens past `info.stream_pos` are lost


class ReplicaSessions:
    def __init__(
        self,
        engine: Engine,
        replica_id: str,
        settings: AppSettings,
        store: SessionStore | None = None,
    ) -> None:
        self.engine = engine
        self.replica_id = replica_id
        self.settings = settings
        self.store = store
        self.entries: dict[str, SessionEntry] = {}
        self.draining = False
        self.writer: CheckpointWriter | None = None
        if store is not None:
            self.writer = CheckpointWriter(store, on_refused=self._moved_away)
        self._claims: dict[str, asyncio.Lock] = {}  # one claim of a session at a time
        # Rebuilds waiting for a slot, first come first served (asyncio.Lock wakes in order).
        self._room_queue = asyncio.Lock()
        self._rebuilds_waiting = 0
        self._line_stuck = False  # the first in line found no room: a freed slot is its

    async def start(self) -> None:
        """Start checkpointing (with a store) and the idle/expiry sweeps."""
        if self.writer is not None:
            self.writer.start()
            await self.engine.watch_snapshots(self._checkpoint)

    # -- opening and resuming --------------------------------------------------------------------
    async def open(self, owner: str = "") -> Attached:
        self._refuse_while_draining()
        session_id = new_session_id(self.replica_id)
        if self._line_stuck:  # rebuilds came first: a freed slot is theirs
            raise self._no_room(f"{self._rebuilds_waiting} session(s) wait for a slot")
        info = await self._with_room(lambda: _open_unless_left(self.engine, session_id))
        entry = self.entries[session_id] = SessionEntry(session_id, owner, epoch=0)
        if (
            self.writer is not None
        ):  # in the store at once: a crash before its first turn loses nothing
            self.writer.submit(self._record(entry, SessionSnapshot(session_id, b"", 0, None)))
        return Attached(info, resumed=False, rebuilt=False)

    async def resume(self, session_id: str, token: str, owner: str = "") -> Attached:
        """Resume for `owner` (the API key name the gateway vouches for; "" without keys)."""
        if not session_id:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "resume needs a session_id")
        # The token first: a caller without it learns nothing and makes nothing wait. It is
        # bound to the owner, so another key's token is refused too (deployments/resume.py).
        known = self.entries.get(session_id)
        check_resume(self.settings.resume_secret, session_id, token, owner, known and known.owner)
        entry = self.entries.get(session_id)
        if self.draining:
            if entry is not None and self.store is not None:
                await self._hand_off(entry)  # its newest state in the store, for the next replica
            self._refuse_while_draining()
        if entry is None:
            claim = self._claims.setdefault(session_id, asyncio.Lock())
            async with claim:
                try:
                    entry = self.entries.get(session_id)
                    if entry is None:
                        return await self._claim(session_id)
                finally:
                    self._claims.pop(session_id, None)
        async with entry.lock:
            if entry.resident:
                info = await self.engine.session_info(session_id, settled=True)
                return Attached(info, resumed=True, rebuilt=False)
            try:
                info = await self._rebuild(entry)
            except ArenaFullError:
                if self.store is not None:  # another replica may have room: let it claim it
                    await self._hand_off(entry, locked=True)
                raise
            return Attached(info, resumed=True, rebuilt=False)

    async def _hand_off(self, entry: SessionEntry, locked: bool = False) -> None:
        """Leave a session to whichever replica resumes it next: its newest snapshot written to
        the store now, held by nobody, forgotten here. A replica that refuses a session it holds
        does this first, so the next one rebuilds the newest state, not an older checkpoint."""
        async with contextlib.AsyncExitStack() as stack:
            if not locked:
                await stack.enter_async_context(entry.lock)
            if entry.stream is not None:
                entry.stream.put_nowait(
                    StreamError(grpc.StatusCode.UNAVAILABLE, "session moving to another replica")
                )
            if entry.resident:
                try:  # a reply in flight ends first (its stream is gone, so it was cancelled)
                    await self.engine.session_info(entry.session_id, settled=True)
                    entry.snapshot = await _to_the_end(
                        self.engine.offload_session(entry.session_id)
                    )
                except (SessionNotFoundError, InvalidRequestError, EngineStoppedError):
                    return
            self.writer.submit(self._record(entry, entry.snapshot))
            if not await self.writer.flush():
                raise StreamError(grpc.StatusCode.UNAVAILABLE, "the session store is unavailable")
            with contextlib.suppress(StoreUnavailableError):
                await self.store.release(entry.session_id, self.replica_id, entry.epoch)
            self.entries.pop(entry.session_id, None)

    async def _claim(self, session_id: str) -> Attached:
        """A session this replica does not hold: take it over from the store and rebuild it."""
        if self.store is None:
            raise SessionNotFoundError(f"session {session_id!r} not found")
        try:
            record = await self.store.claim(session_id, self.replica_id)
        except StoreUnavailableError as error:
            raise StreamError(
                grpc.StatusCode.UNAVAILABLE, f"the session store is unavailable: {error}"
            ) from None
        if record is None:
            raise SessionNotFoundError(f"session {session_id!r} not found")
        self._check_compatible(record)
        snapshot = SessionSnapshot(
            session_id, record.token_bytes(), record.stream_pos, record.open_reply
        )
        entry = SessionEntry(session_id, record.owner, epoch=record.epoch, snapshot=snapshot)
        self.entries[session_id] = entry
        async with entry.lock:
            try:
                try:
                    info = await self._rebuild(entry)
                except SessionExistsError:
                    # The engine holds a copy this replica does not know (a claim or a move away
                    # cut short, from another snapshot): no stream is attached to it, so it goes.
                    await self._close_orphan(session_id)
                    info = await self._rebuild(entry)
            except BaseException:
                self.entries.pop(session_id, None)
                raise
        log.info("session %s rebuilt at stream position %d", session_id, info.stream_pos)
        return Attached(info, resumed=True, rebuilt=True)

    def _check_compatible(self, record: SessionRecord) -> None:
        engine = self.settings.engine
        if (record.model, record.sink, record.window) != (engine.model, engine.sink, engine.window):
            raise StreamError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the session was made with model {record.model} and cache "
                f"{record.sink}+{record.window}; this service runs {engine.model} with "
                f"{engine.sink}+{engine.window}",
            )

    async def _rebuild(self, entry: SessionEntry) -> SessionInfo:
        """Put an offloaded session back into a slot (caller holds its lock). With no slot to be
        had, wait in line (first come, first served) for at most REBUILD_WAIT_S; a full line or
        a wait past it is refused (ArenaFullError, with a retry hint)."""
        snapshot = entry.snapshot
        if self._rebuilds_waiting >= MAX_QUEUED_REBUILDS:
            raise self._no_room(f"{self._rebuilds_waiting} session(s) wait for a slot")
        deadline = time.monotonic() + REBUILD_WAIT_S
        waited = f"waited {REBUILD_WAIT_S:.0f} s for a slot"
        self._rebuilds_waiting += 1
        try:
            try:  # our turn in line (the restore itself is never timed out: see _to_the_end)
                async with asyncio.timeout(REBUILD_WAIT_S):
                    await self._room_queue.acquire()
            except TimeoutError:
                raise self._no_room(waited) from None
            try:
                while True:
                    try:
                        info = await self._with_room(
                            lambda: _to_the_end(self.engine.restore_session(snapshot))
                        )
                        break
                    except ArenaFullError:
                        if time.monotonic() > deadline:
                            raise self._no_room(waited) from None
                        self._line_stuck = True
                        await asyncio.sleep(0.05)
            finally:
                self._line_stuck = False  # the next in line tries for itself
                self._room_queue.release()
        finally:
            self._rebuilds_waiting -= 1
        entry.snapshot = None
        entry.last_active = time.monotonic()
        return info

    async def _with_room(self, make):
        """Run `make()` (an open or a rebuild); when every slot is taken, offload the least
        recently active idle session to make room, and try again (others making room at the
        same time may take a freed slot first: go on while idle sessions remain)."""
        while True:
            try:
                return await make()
            except ArenaFullError:
                if not await self._offload_least_recent():
                    raise self._no_room() from None

    def _no_room(self, why: str = "") -> ArenaFullError:
        """The refusal when no slot can be had, with when one may be (the earliest end of a
        conversation's pause, else CONVERSING_S): "retry in N s", as quotas say it."""
        now = time.monotonic()
        ends = [e.conversing_until() for e in self.entries.values() if e.resident]
        pauses = [until - now for until in ends if until is not None and until != float("inf")]
        retry_s = max(1.0, min(pauses, default=CONVERSING_S))
        reason = why or "every cache slot holds a session in a conversation"
        return ArenaFullError(f"{reason}; retry in {retry_s:.0f} s")

    async def _offload_least_recent(self) -> bool:
        idle = [e for e in self.entries.values() if e.resident and e.conversing_until() is None]
        # Detached sessions first, then the least recently active.
        idle.sort(key=lambda e: (e.stream is not None, e.last_active))
        for entry in idle:
            if await self._offload(entry):
                return True
        return False

    async def _offload(self, entry: SessionEntry) -> bool:
        """Take an idle session off the device; False if it is busy or gone."""
        if entry.lock.locked():
            return False
        async with entry.lock:
            if not entry.resident or entry.inflight:
                return False
            try:
                entry.snapshot = await _to_the_end(self.engine.offload_session(entry.session_id))
            except (SessionNotFoundError, InvalidRequestError):  # gone, or busy after all
                return False
        if self.writer is not None:
            self.writer.submit(self._record(entry, entry.snapshot))
        return True

    # -- streams and turns -----------------------------------------------------------------------
    def attach(self, session_id: str, out: asyncio.Queue) -> None:
        """The stream with outbox `out` now owns the session; a previous stream is told why."""
        entry = self.entries[session_id]
        if entry.stream is not None and entry.stream is not out:
            entry.stream.put_nowait(
                StreamError(grpc.StatusCode.ABORTED, "session resumed on another stream")
            )
        entry.stream = out
        entry.detached_since = None
        entry.last_active = time.monotonic()

    def holds_stream(self, session_id: str, out: asyncio.Queue) -> bool:
        """Whether the stream with outbox `out` is still the one attached to the session."""
        entry = self.entries.get(session_id)
        return entry is not None and entry.stream is out

    def detach(self, session_id: str, out: asyncio.Queue, closed: bool) -> None:
        entry = self.entries.get(session_id)
        if entry is None or entry.stream is not out:
            return
        entry.stream = None
        entry.detached_since = time.monotonic()
        if not closed and entry.inflight:
            asyncio.get_running_loop().create_task(self._cancel_quietly(session_id))

    async def before_append(self, session_id: str) -> None:
        """Called before each append goes to the engine: the session is busy from now on (no
        offload takes it), and is rebuilt first if it was offloaded."""
        entry = self._entry(session_id)
        async with entry.lock:  # an offload in progress finishes first, and then we rebuild
            entry.inflight += 1
            entry.last_active = time.monotonic()
            if not entry.resident:
                try:
                    await self._rebuild(entry)
                except BaseException:
                    entry.inflight -= 1
                    raise

    def append_refused(self, session_id: str) -> None:
        """The append that `before_append` announced was refused by the engine."""
        self.turn_ended(session_id)

    def turn_ended(self, session_id: str) -> None:
        entry = self.entries.get(session_id)
        if entry is not None:
            entry.inflight = max(0, entry.inflight - 1)
            entry.last_active = entry.turn_ended_at = time.monotonic()

    async def close(self, session_id: str) -> int:
        """End the session everywhere; returns its final stream position."""
        entry = self._entry(session_id)
        async with entry.lock:
            if entry.resident:
                info = await self.engine.session_info(session_id)
                stream_pos = info.stream_pos
                await _to_the_end(self.engine.close(session_id))
            else:
                stream_pos = entry.snapshot.stream_pos
        self.entries.pop(session_id, None)
        await self._forget(session_id)
        return stream_pos

    def _entry(self, session_id: str) -> SessionEntry:
        entry = self.entries.get(session_id)
        if entry is None:
            raise SessionNotFoundError(f"session {session_id!r} not found")
        return entry

    async def _cancel_quietly(self, session_id: str) -> None:
        with contextlib.suppress(SessionNotFoundError, EngineStoppedError):
            await self.engine.cancel(session_id)  # nobody is reading the reply any more

    async def _forget(self, session_id: str) -> None:
        """Remove a closed or expired session from the store too."""
        if self.writer is None:
            return
        self.writer.forget(session_id)
        await self.writer.wait_for_in_flight()
        try:
            await self.store.delete(session_id)
        except StoreUnavailableError as error:  # it expires by itself after the TTL
            log.warning("could not delete session %s from the store: %s", session_id, error)

    # -- checkpoints -----------------------------------------------------------------------------
    def _checkpoint(self, snapshots: list[SessionSnapshot]) -> None:
        for snapshot in snapshots:
            entry = self.entries.get(snapshot.session_id)
            if entry is not None:
                self.writer.submit(self._record(entry, snapshot))

    async def turn_durable(self, session_id: str) -> None:
        """Return once the session's newest checkpoint (its turn end's) is in the store, so that
        the TurnEnd sent next survives a crash (`durable_turn_ends`). At once without a store or
        while it is down (the checkpoint is retried; the store's outage is the risk then)."""
        if self.writer is not None and self.settings.durable_turn_ends:
            await self.writer.until_written(session_id)

    def _record(self, entry: SessionEntry, snapshot: SessionSnapshot) -> SessionRecord:
        engine = self.settings.engine
        return SessionRecord.from_snapshot_bytes(
            session_id=entry.session_id,
            token_bytes=snapshot.tokens,
            stream_pos=snapshot.stream_pos,
            open_reply=snapshot.open_reply,
            owner=entry.owner,
            model=engine.model,
            sink=engine.sink,
            window=engine.window,
            epoch=entry.epoch,
            replica_id=self.replica_id,
            updated_at=time.time(),
        )

    def _moved_away(self, session_ids: list[str]) -> None:
        """Another replica claimed these sessions since: drop them here (never from the store)."""
        for session_id in session_ids:
            entry = self.entries.pop(session_id, None)
            if entry is None:
                continue
            log.info("session %s moved to another replica; dropping it here", session_id)
            if entry.stream is not None:
                entry.stream.put_nowait(
                    StreamError(grpc.StatusCode.ABORTED, "session resumed on another replica")
                )
            if entry.resident:
                asyncio.get_running_loop().create_task(self._close_quietly(session_id))

    async def _close_quietly(self, session_id: str) -> None:
        if session_id in self.entries:  # claimed back here meanwhile: that copy is ours
            return
        with contextlib.suppress(SessionNotFoundError, EngineStoppedError):
            await self.engine.close(session_id)

    async def _close_orphan(self, session_id: str) -> None:
        """Close an engine copy of a session this replica holds no entry for; a reply it may still
        run ends first (a closing session stays in the engine until its reply drains)."""
        with contextlib.suppress(SessionNotFoundError):
            await self.engine.cancel(session_id)
            await self.engine.session_info(session_id, settled=True)
            await _to_the_end(self.engine.close(session_id))

    # -- sweeps ----------------------------------------------------------------------------------
    async def sweep(self, period_s: float = 1.0) -> None:
        """Forever: offload sessions idle with no stream, expire those detached past the TTL."""
        while True:
            await asyncio.sleep(period_s)
            try:
                await self._sweep_once(time.monotonic())
            except EngineStoppedError:
                return
            except Exception:
                log.exception("session sweep failed")

    async def _sweep_once(self, now: float) -> None:
        ttl = self.settings.session_ttl_s
        idle_after = self.settings.idle_offload_s
        for entry in list(self.entries.values()):
            if entry.stream is not None or entry.inflight or entry.detached_since is None:
                continue
            if now - entry.detached_since > ttl:
                await self._expire(entry)
                continue
            idle = entry.resident and now - entry.last_active > idle_after
            if idle and await self._offload(entry) and self.store is not None:
                await self._hand_back(entry)

    async def _expire(self, entry: SessionEntry) -> None:
        with contextlib.suppress(SessionNotFoundError):
            await self.close(entry.session_id)
        log.info(
            "session %s expired after %.0f s detached",
            entry.session_id,
            self.settings.session_ttl_s,
        )

    async def _hand_back(self, entry: SessionEntry) -> None:
        """An offloaded session's newest record is in the store: let whoever resumes it first
        claim it, and forget it here."""
        if not await self.writer.flush():
            return  # the store is down: keep it here, try again next sweep
        try:
            await self.store.release(entry.session_id, self.replica_id, entry.epoch)
        except StoreUnavailableError:
            return
        if entry.stream is None and not entry.inflight and not entry.resident:
            self.entries.pop(entry.session_id, None)

    # -- drain -----------------------------------------------------------------------------------
    def _refuse_while_draining(self) -> None:
        if self.draining:
            raise StreamError(grpc.StatusCode.UNAVAILABLE, "replica draining: try another")

    async def drain(self, timeout_s: float) -> None:
        """Stop taking sessions, let replies in flight finish (cancel what is left at the
        deadline), and leave every session in the store for another replica to rebuild."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        cancel_at = deadline - min(5.0, timeout_s / 3)
        while any(e.inflight for e in self.entries.values()) and time.monotonic() < cancel_at:
            await asyncio.sleep(0.05)
        busy = [e.session_id for e in self.entries.values() if e.inflight]
        for session_id in busy:
            await self._cancel_quietly(session_id)
        while any(e.inflight for e in self.entries.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.writer is None:
            return
        await self.writer.flush()
        for entry in list(self.entries.values()):
            with contextlib.suppress(StoreUnavailableError):
                await self.store.release(entry.session_id, self.replica_id, entry.epoch)
        await self.writer.stop(timeout_s=max(1.0, deadline - time.monotonic()))

    def end_streams(self) -> None:
        """End every attached stream: its client resumes the session on another replica."""
        for entry in self.entries.values():
            if entry.stream is not None:
                entry.stream.put_nowait(
                    StreamError(
                        grpc.StatusCode.UNAVAILABLE,
                        "replica draining: resume the session; it continues where it stands",
                    )
                )

    # -- stats -----------------------------------------------------------------------------------
    @property
    def offloaded(self) -> int:
        return sum(1 for e in self.entries.values() if not e.resident)

    def owner_counts(self) -> dict[str, int]:
        """Sessions held here (with a slot or offloaded) by API key name: what gateways count
        against a key's max_sessions quota."""
        return dict(Counter(entry.owner for entry in self.entries.values()))


async def _open_unless_left(engine: Engine, session_id: str) -> SessionInfo:
    """Open a session; if the stream goes away while it opens (its caller is cancelled), close it
    once it is open: nobody learned its id, so it would hold its slot forever (found by fuzzing)."""
    opening = asyncio.ensure_future(engine.open_session(session_id))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:

        def close_orphan(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                task = asyncio.ensure_future(engine.close(session_id))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

        opening.add_done_callback(close_orphan)
        raise


async def _to_the_end(call: Awaitable[T]) -> T:
    """Await an engine call that changes which sessions the engine holds (restore, offload,
    close) to its end, even when our caller is cancelled meanwhile (its stream went away), so
    that its result is recorded here: otherwise this replica and its engine disagree, and the
    session's next restore is refused as already there (seen in CI as ALREADY_EXISTS, a session
    lost, after a resume was cancelled mid-rebuild). The caller is cancelled at its next await.
    An open is the other case: nobody learned the new id, so `_open_unless_left` closes it."""
    task = asyncio.ensure_future(call)
    cancelled = False
    try:
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():
                    raise
                cancelled = True
                asyncio.current_task().uncancel()
    finally:
        if cancelled:
            asyncio.current_task().cancel()
