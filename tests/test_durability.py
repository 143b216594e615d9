"""A TurnEnd the client saw is durable: a replica sends it only once the session's checkpoint at
that turn's end is in the session store (group commit with the checkpoint writer's next flush), so
a crash right after it cannot bring the session back behind it. Against a real engine (tiny random
model on CPU), a real replica gRPC server over loopback and a real SQLite file; the store is
wrapped only to hold a write back, which is how the ordering is made observable."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest

from deployments.internal import gateway_metadata, internal_token
from deployments.session_service import start_replica_server
from deployments.settings import AppSettings
from deployments.store import (
    CheckpointWriter,
    SessionRecord,
    SqliteSessionStore,
    StoreUnavailableError,
)
from sinkcache.config import CacheGeometry
from sinkwire.v1 import streaming_llm_pb2 as pb
from sinkwire.v1 import streaming_llm_pb2_grpc as pb_grpc
from tests.tiny_engine import make_engine, tiny_models

SECRET = "test-secret-" + "d" * 32
SINK, WINDOW = 2, 10
# How long a held write waits for the client to see the TurnEnd when turn ends are durable: they
# never let the TurnEnd out while its write is held, so it always waits this long (a cap, not a
# schedule). Without durable turn ends the TurnEnd comes while the write is held: a hard cap only.
HOLD_CAP_S = 3.0
HARD_CAP_S = 60.0


@pytest.fixture(scope="module")
def model():
    return tiny_models()[1]


class HeldWrites:
    """A real SQLite store whose writes carrying a turn's end (a record past stream position 0)
    wait until `released` is set or HOLD_CAP_S passes; `log` says what happened in which order."""

    def __init__(
        self, store: SqliteSessionStore, failing: bool = False, hold_s: float = HOLD_CAP_S
    ) -> None:
        self.store = store
        self.ttl_s = store.ttl_s
        self.failing = failing
        self.hold_s = hold_s
        self.released = asyncio.Event()
        self.log: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    async def put_many(self, records: Sequence[SessionRecord]) -> list[str]:
        if any(record.stream_pos > 0 for record in records):
            if self.failing:
                raise StoreUnavailableError("the store is down (test)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.hold_s)
            refused = await self.store.put_many(records)
            self.log.append("turn stored")
            return refused
        return await self.store.put_many(records)


async def one_turn(port: int, held: HeldWrites, reader: SqliteSessionStore) -> tuple[int, int]:
    """Open a session, take one 4-token reply; at its TurnEnd, release the held write and read
    the store. Returns (the TurnEnd's stream position, the stored position when it arrived)."""
    to_server: asyncio.Queue[pb.ClientMessage | None] = asyncio.Queue()
    to_server.put_nowait(pb.ClientMessage(open=pb.Open()))

    async def requests() -> AsyncIterator[pb.ClientMessage]:
        while (message := await to_server.get()) is not None:
            yield message

    metadata = gateway_metadata(internal_token(SECRET), "")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.StreamingLLMStub(channel).Session(requests(), metadata=metadata)
        session_id = ""
        async with asyncio.timeout(60):
            async for reply in call:
                if reply.HasField("opened"):
                    session_id = reply.opened.session_id
                    generate = pb.GenerationParams(max_new_tokens=4, ignore_eos=True)
                    append = pb.Append(tokens=pb.TokenIds(ids=[5, 6, 7]), generate=generate)
                    to_server.put_nowait(pb.ClientMessage(append=append))
                elif reply.HasField("turn_end"):
                    # What a crash now would leave: the store as the client sees the TurnEnd.
                    record = await reader.get(session_id)
                    held.log.append("turn end seen")
                    held.released.set()
                    to_server.put_nowait(None)
                    stored = record.stream_pos if record is not None else -1
                    return reply.turn_end.stream_position, stored
    raise AssertionError("the stream ended without a TurnEnd")


async def run_one_turn(
    model, tmp_path: Path, durable: bool, failing: bool = False
) -> tuple[int, int, list[str]]:
    settings = AppSettings.from_args(
        {
            "model": "tiny",
            "sink": SINK,
            "window": WINDOW,
            "resume_secret": SECRET,
            "durable_turn_ends": str(durable),
        }
    )
    engine = make_engine(model, CacheGeometry(SINK, WINDOW))
    store = SqliteSessionStore(tmp_path / "sessions.db", ttl_s=60.0)
    reader = SqliteSessionStore(tmp_path / "sessions.db", ttl_s=60.0)  # another connection
    held = HeldWrites(store, failing, hold_s=HOLD_CAP_S if durable else HARD_CAP_S)
    server, sessions, _, port = await start_replica_server(engine, "r0", settings, store=held)
    try:
        turn_end, stored = await one_turn(port, held, reader)
        return turn_end, stored, held.log
    finally:
        await server.stop(grace=None)
        await sessions.writer.stop(timeout_s=5)
        await engine.shutdown()
        await store.close()
        await reader.close()


async def test_a_turn_end_is_sent_only_once_its_checkpoint_is_in_the_store(
    model, tmp_path: Path
) -> None:
    """Issue 19 defect 6: a chaos drill saw 12 of 51 resumed sessions come back behind a TurnEnd
    the server had sent, because the checkpoint was written behind the acknowledgement."""
    turn_end, stored, log = await run_one_turn(model, tmp_path, durable=True)
    assert turn_end == 3 + 4
    assert log == ["turn stored", "turn end seen"], log
    assert stored >= turn_end, (
        f"the client saw the turn end at stream position {turn_end} while the store held "
        f"{stored}: a crash now would resume the session behind a turn the client saw end"
    )


async def test_durable_turn_ends_off_sends_the_turn_end_at_once(model, tmp_path: Path) -> None:
    """The documented trade: with durable_turn_ends off the TurnEnd does not wait for the store,
    so it can arrive while its checkpoint is still on its way (what a crash may then lose)."""
    turn_end, stored, log = await run_one_turn(model, tmp_path, durable=False)
    assert log[0] == "turn end seen", log
    assert stored < turn_end


async def test_a_store_that_is_down_does_not_hold_turn_ends(model, tmp_path: Path) -> None:
    """Serving goes on while the store is down: the TurnEnd goes out once the write carrying
    its checkpoint has failed (the checkpoint stays pending and is retried)."""
    turn_end, stored, _ = await run_one_turn(model, tmp_path, durable=True, failing=True)
    assert turn_end == 3 + 4
    assert stored < turn_end


# -- the writer's group commit alone (a real SQLite file, no engine) --------------------------------
def stored_record(session_id: str, stream_pos: int) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        tokens=(5, 6, 7),
        stream_pos=stream_pos,
        open_reply=None,
        owner="",
        model="tiny",
        sink=SINK,
        window=WINDOW,
        epoch=0,
        replica_id="r0",
        updated_at=1_750_000_000.0,
    )


async def test_until_written_returns_once_the_flush_carrying_the_record_landed(
    tmp_path: Path,
) -> None:
    store = SqliteSessionStore(tmp_path / "sessions.db", ttl_s=60.0)
    writer = CheckpointWriter(store, interval_s=0.05)
    writer.start()
    try:
        assert await writer.until_written("never-submitted")
        waits = []
        for i in range(20):  # many sessions, one or a few flushes
            writer.submit(stored_record(f"s{i}", 10 + i))
            waits.append(asyncio.create_task(writer.until_written(f"s{i}")))
        assert all(await asyncio.gather(*waits))
        for i in range(20):
            assert (await store.get(f"s{i}")).stream_pos == 10 + i
        assert writer.flushes <= 3, "group commit: the waits share flushes"
        writer.submit(stored_record("s0", 99))
        writer.forget("s0")  # a closed session's wait ends too
        assert await asyncio.wait_for(writer.until_written("s0"), 5)
    finally:
        await writer.stop()
        await store.close()


async def test_until_written_does_not_wait_on_a_store_that_is_down(tmp_path: Path) -> None:
    store = SqliteSessionStore(tmp_path / "sessions.db", ttl_s=60.0)
    held = HeldWrites(store, failing=True)
    writer = CheckpointWriter(held, interval_s=0.05, backoff_min_s=1.0)
    writer.start()
    try:
        writer.submit(stored_record("s0", 10))
        assert not await asyncio.wait_for(writer.until_written("s0"), 5)
        writer.submit(stored_record("s0", 11))  # while failing: no wait for the retry
        assert not await asyncio.wait_for(writer.until_written("s0"), 0.5)
        assert writer.pending == 1
    finally:
        await writer.stop(timeout_s=0.1)
        await store.close()
