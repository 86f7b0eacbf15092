"""The relay's batched completion and its pipeline, on real databases and brokers.

- A round is recorded in one transaction. On PostgreSQL it first locks the round's key rows with
  ``SKIP LOCKED``: a key a writer holds right then is completed after the round in a transaction
  of its own, and a key whose claim was taken over is left to its new owner.
- Writers appending to several keys in random orders while a relay records round after round
  never deadlock with it (PostgreSQL aborts one side of a lock cycle: the test would see it).
- ``drain()`` overlaps publishing a round with recording the one before and claiming the next:
  every event still goes out once per publish, each key in commit order; a broker outage or a
  cancellation in the middle leaves no key claimed, records what the broker took and loses
  nothing.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import anyio
import pytest
from sqlalchemy import event, select, update

from saga_brokers import InMemoryBroker
from saga_core import BrokerUnavailable, ConsumerRunner, Message, OutboxWorker
from saga_core.ports import Broker
from saga_core.records import OutboxRecord
from saga_core.states import OutboxStatus
from saga_storage import SqlStorage, create_storage
from tests.outbox.app import (
    append_with_witness,
    commit_events,
    create_app_tables,
    expected_order,
    make_event,
    order_problems,
    outbox_rows,
    with_app_name,
)
from tests.outbox.conftest import Collector, Db, Target, outage_params, sessions

pytestmark = pytest.mark.anyio

STORAGES = ["sqlite", "postgresql"]


@pytest.fixture(params=STORAGES)
def app_storage(
    request: pytest.FixtureRequest, make_db: Callable[[str], Db]
) -> Iterator[SqlStorage]:
    """A storage on an empty database of each kind, with the test application's tables."""
    storage = create_storage(make_db(request.param).url)
    create_app_tables(storage.engine)
    yield storage
    storage.dispose()


def _commit(storage: SqlStorage, keys: Sequence[str], per_key: int, topic: str = "acct") -> None:
    """``per_key`` events on each of ``keys``, one transaction per event, keys interleaved."""
    for n in range(per_key):
        for key in keys:
            commit_events(storage, [make_event(topic, key, writer="setup", n=n)], writer="setup")


def _key_rows(storage: SqlStorage) -> dict[str, tuple[int, int, str | None]]:
    """key -> (last_seq, sent_seq, claim_token)."""
    okey = storage.tables.outbox_key
    with storage.engine.connect() as conn:
        rows = conn.execute(
            select(okey.c.key, okey.c.last_seq, okey.c.sent_seq, okey.c.claim_token)
        ).all()
    return {r.key: (r.last_seq, r.sent_seq, r.claim_token) for r in rows}


def _in_seq_order(storage: SqlStorage) -> dict[str, list[str]]:
    """Per key, the event ids in sequence order (commit order)."""
    out: dict[str, list[str]] = {}
    for r in outbox_rows(storage):
        out.setdefault(r.key, []).append(r.event_id)
    return out


def _claimed_keys(storage: SqlStorage) -> list[str]:
    okey = storage.tables.outbox_key
    with storage.engine.connect() as conn:
        return list(
            conn.execute(select(okey.c.key).where(okey.c.claim_token.is_not(None))).scalars()
        )


class Recording:
    """Wraps a broker; keeps the messages it acknowledged, in order. ``hook(n)`` runs before
    the n-th publish (from 1) and may raise or wait."""

    def __init__(self, inner: Broker, hook: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.inner = inner
        self.hook = hook
        self.calls = 0
        self.acked: list[Message] = []

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        self.calls += 1
        if self.hook is not None:
            await self.hook(self.calls)
        results = await self.inner.publish(messages)
        self.acked.extend(m for m, r in zip(messages, results, strict=True) if r is None)
        return results

    def pairs(self) -> list[tuple[str, str]]:
        return [(m.key, m.event_id) for m in self.acked]

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- claims --------------------------------------------------------------------------------------


def test_claimed_rows_map_onto_outbox_record_fields_in_order(tmp_path: Any) -> None:
    """The relay builds records from claimed rows by position: the statement must select
    ``OutboxRecord``'s fields, in their order."""
    storage = create_storage(f"sqlite:///{tmp_path / 'x.db'}")
    selected = [c.name for c in storage.sql.claimed_events.selected_columns]
    assert selected == [f.name for f in dataclasses.fields(OutboxRecord)]
    storage.dispose()


async def test_a_claim_carries_each_event_as_stored(app_storage: SqlStorage) -> None:
    storage = app_storage
    event = make_event("acct", "a", writer="w", n=1)
    commit_events(storage, [event], writer="w")
    [claim] = await storage.claim_outbox("t", max_keys=10, max_events=10, claim_seconds=30)
    [record] = claim.events
    assert (record.event_id, record.topic, record.key, record.seq) == (
        event.event_id,
        "acct",
        "a",
        1,
    )
    assert record.event_type == event.event_type and record.payload == event.payload_json()
    assert dict(record.headers) == event.message_headers()
    assert (record.status, record.attempts, record.last_error) == (OutboxStatus.PENDING, 0, None)
    assert isinstance(record.id, int) and record.created_at > 0


# --- completion in one transaction --------------------------------------------------------------


async def test_a_round_is_recorded_in_one_transaction(app_storage: SqlStorage) -> None:
    storage = app_storage
    keys = [f"k{i:02d}" for i in range(30)]
    _commit(storage, keys, 2)
    claims = await storage.claim_outbox("t", max_keys=100, max_events=10, claim_seconds=30)
    assert len(claims) == 30
    commits: list[int] = []

    def on_commit(conn: Any) -> None:
        commits.append(1)

    event.listen(storage.engine, "commit", on_commit)
    try:
        follows = await storage.complete_outbox_many(
            [(c, len(c.events), None) for c in claims], retry_in=0.0, dead_after=3
        )
    finally:
        event.remove(storage.engine, "commit", on_commit)
    assert follows == []
    assert len(commits) == 1, "30 keys took more than one transaction"
    assert _key_rows(storage) == {k: (2, 2, None) for k in keys}
    assert {r.status for r in outbox_rows(storage)} == {"SENT"}


async def test_a_key_taken_over_is_left_to_its_new_owner(app_storage: SqlStorage) -> None:
    """A key whose claim expired and was claimed again is neither advanced nor released by the
    old owner's completion; the other keys of the round are."""
    storage = app_storage
    _commit(storage, ["a", "b", "c"], 2)
    claims = await storage.claim_outbox("t", max_keys=10, max_events=10, claim_seconds=30)
    okey = storage.tables.outbox_key
    with storage.engine.begin() as conn:  # what a relay taking over the expired claim does
        conn.execute(update(okey).where(okey.c.key == "b").values(claim_token="another-relay"))
    await storage.complete_outbox_many(
        [(c, len(c.events), None) for c in claims], retry_in=0.0, dead_after=3
    )
    assert _key_rows(storage) == {
        "a": (2, 2, None),
        "b": (2, 0, "another-relay"),
        "c": (2, 2, None),
    }
    assert [(r.key, r.status) for r in outbox_rows(storage) if r.status != "SENT"] == [
        ("b", "PENDING"),
        ("b", "PENDING"),
    ]


async def test_a_key_a_writer_holds_is_completed_after_the_round(pg_db: Db) -> None:
    """A writer's open transaction holds one key of the round: the round commits without it
    (the relay holds nothing while it waits), then that key alone waits for the writer and is
    completed once the writer commits; the writer's own event stays pending, next in line."""
    assert pg_db.schema is not None
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    relay_name = f"{pg_db.schema}-relay"
    relay_storage = create_storage(with_app_name(pg_db.url, relay_name), migrate=False)
    keys = ["k1", "k2", "k3", "k4"]
    _commit(storage, keys, 2)
    claims = await relay_storage.claim_outbox("t", max_keys=10, max_events=10, claim_seconds=30)
    assert sorted(c.key for c in claims) == keys
    late = make_event("acct", "k2", writer="w", n=9)
    appended, commit = threading.Event(), threading.Event()

    def writer() -> None:
        with storage.engine.begin() as conn:
            append_with_witness(storage, conn, late, writer="w")  # locks k2's key row
            appended.set()
            assert commit.wait(30), "the test never let the writer commit"

    def relay_waits() -> bool:
        return any(
            s["application_name"] == relay_name and s["wait_event_type"] == "Lock"
            for s in sessions(pg_db)
        )

    follows: list[Any] = []

    async def complete() -> None:
        follows.extend(
            await relay_storage.complete_outbox_many(
                [(c, len(c.events), None) for c in claims], retry_in=0.0, dead_after=3
            )
        )

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, writer)
            assert await anyio.to_thread.run_sync(appended.wait, 30)
            tg.start_soon(complete)
            with anyio.fail_after(30):
                while not relay_waits():
                    await anyio.sleep(0.02)
            # The round committed without k2; k2 still carries the relay's claim.
            rows = _key_rows(storage)
            assert {k: rows[k][:2] for k in ("k1", "k3", "k4")} == {
                "k1": (2, 2),
                "k3": (2, 2),
                "k4": (2, 2),
            }
            assert rows["k1"][2] is None and rows["k2"][1:] == (0, claims[0].token)
            commit.set()
        assert follows == []
        rows = _key_rows(storage)
        assert rows == {
            "k1": (2, 2, None),
            "k2": (3, 2, None),
            "k3": (2, 2, None),
            "k4": (2, 2, None),
        }
        pending = [(r.key, r.seq, r.event_id) for r in outbox_rows(storage) if r.status != "SENT"]
        assert pending == [("k2", 3, late.event_id)]
        broker = InMemoryBroker()
        assert await OutboxWorker(relay_storage, broker).drain() == 1
        assert [m.event_id for m in broker.messages()] == [late.event_id]
    finally:
        commit.set()
        relay_storage.dispose()
        storage.dispose()


async def test_writers_of_several_keys_in_random_orders_never_deadlock_the_relay(
    pg_db: Db,
) -> None:
    """Writers append to 2-4 of their keys per transaction in random order, holding each key a
    little, while a relay records round after round of small batches (so rounds mix keys that
    writers are holding). No transaction may fail; every event goes out once, in key order."""
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    seed = random.randrange(1 << 30)
    print(f"seed={seed}")
    writers, transactions = 4, 40
    key_sets = [[f"w{w}-k{i}" for i in range(5)] for w in range(writers)]
    done = threading.Event()
    errors: list[BaseException] = []

    def write(w: int) -> None:
        # Each writer has keys of its own: writers never wait for each other, only a relay
        # could close a lock cycle with one.
        rng = random.Random(seed + w)
        try:
            for n in range(transactions):
                keys = rng.sample(key_sets[w], rng.randint(2, 4))
                with storage.engine.begin() as conn:
                    for key in keys:
                        append_with_witness(
                            storage, conn, make_event("acct", key, writer=f"w{w}", n=n), writer="w"
                        )
                        time.sleep(rng.uniform(0, 0.004))
        except BaseException as exc:
            errors.append(exc)

    broker = Recording(InMemoryBroker())
    relay = OutboxWorker(storage, broker, batch_keys=6, batch_events=2)
    rounds = 0

    async def relay_until_done() -> None:
        nonlocal rounds
        while not done.is_set():
            try:
                await relay.drain()
            except Exception as exc:
                errors.append(exc)
                return
            rounds += 1
            await anyio.sleep(0.001)

    def run_writers() -> None:
        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay_until_done)
            await anyio.to_thread.run_sync(run_writers)
        assert errors == [], f"a writer or the relay failed: {errors!r}"
        await relay.drain()
        expected = expected_order(storage.engine)
        assert expected == _in_seq_order(storage)  # the outbox sequence is the commit order
        assert sorted(e for _, e in broker.pairs()) == sorted(
            e for ids in expected.values() for e in ids
        )
        assert order_problems(broker.pairs(), expected) == []
        assert {r.status for r in outbox_rows(storage)} == {"SENT"}
        assert _claimed_keys(storage) == []
    finally:
        done.set()
        storage.dispose()


# --- the pipeline --------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_target", ["kafka", "rabbitmq", "redis"], indirect=True)
async def test_pipelined_drain_sends_each_event_once_in_key_order_and_survives_an_outage(
    pg_db: Db, shared_target: Target
) -> None:
    """Many rounds through a real broker, the 4th publish failing with ``BrokerUnavailable``
    while the round before waits to be recorded and the next one is claimed: the failed drain
    records the first, gives back the others (no key claimed, no attempt used), and the next
    drain sends the rest. Each event is acknowledged once; the consumer sees every key in
    commit order."""
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    topic = shared_target.names.topic("pipe")
    keys = [f"acct-{i:02d}" for i in range(24)]
    _commit(storage, keys, 6, topic)
    inner = shared_target.open()
    collector = Collector()
    runner = ConsumerRunner(
        inner, [topic], shared_target.names.group("pipe"), collector.handle, poll_timeout=0.2
    )

    async def outage_at_4th(call: int) -> None:
        if call == 4:
            raise BrokerUnavailable("injected: broker went away")

    broker = Recording(inner, outage_at_4th)
    relay = OutboxWorker(storage, broker, batch_keys=5, batch_events=2)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            with pytest.raises(BrokerUnavailable):
                await relay.drain()
            # Three rounds went out; all are recorded, nothing is left claimed.
            assert len(broker.acked) == 30
            assert _claimed_keys(storage) == []
            rows = outbox_rows(storage)
            assert {r.event_id for r in rows if r.status == "SENT"} == {
                m.event_id for m in broker.acked
            }
            assert {r.attempts for r in rows} == {0}
            assert await relay.drain() == 24 * 6 - 30
            await collector.wait_for([r.event_id for r in rows], 60, "every event")
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await inner.aclose()
    expected = expected_order(storage.engine)
    assert [e for _, e in broker.pairs()] and sorted(e for _, e in broker.pairs()) == sorted(
        e for ids in expected.values() for e in ids
    )
    assert order_problems(broker.pairs(), expected) == []
    assert order_problems(collector.pairs(), expected) == []
    assert relay.published == 24 * 6
    assert {r.status for r in outbox_rows(storage)} == {"SENT"}
    assert _claimed_keys(storage) == []
    storage.dispose()


@pytest.mark.parametrize("outage_target", outage_params("redis"), indirect=True)
async def test_broker_killed_mid_pipeline_loses_nothing(pg_db: Db, outage_target: Target) -> None:
    """The real broker is SIGKILLed just before a publish in the middle of a drain: the adapter
    reports it unavailable, the drain gives every unrecorded key back and records what went
    out; restarted (same data), the next drain sends the rest, each key in order."""
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    topic = outage_target.names.topic("kill")
    keys = [f"acct-{i:02d}" for i in range(20)]
    _commit(storage, keys, 6, topic)
    inner = outage_target.open()

    async def kill_at_3rd(call: int) -> None:
        if call == 3:
            await anyio.to_thread.run_sync(outage_target.stop)

    broker = Recording(inner, kill_at_3rd)
    relay = OutboxWorker(storage, broker, batch_keys=4, batch_events=3)
    try:
        with pytest.raises(BrokerUnavailable):
            await relay.drain()
        assert _claimed_keys(storage) == []
        sent = {r.event_id for r in outbox_rows(storage) if r.status == "SENT"}
        assert sent == {m.event_id for m in broker.acked} and len(sent) == 24
        await anyio.to_thread.run_sync(outage_target.start)
        with anyio.fail_after(60):
            while True:
                try:
                    await relay.drain()
                    break
                except BrokerUnavailable:  # the client reconnecting
                    await anyio.sleep(0.2)
        collector = Collector()
        runner = ConsumerRunner(
            inner, [topic], outage_target.names.group("kill"), collector.handle, poll_timeout=0.2
        )
        everything = [r.event_id for r in outbox_rows(storage)]
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            await collector.wait_for(everything, 60, "every event after the restart")
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await inner.aclose()
    expected = expected_order(storage.engine)
    assert order_problems(broker.pairs(), expected) == []
    assert order_problems(collector.pairs(), expected) == []
    assert {r.status for r in outbox_rows(storage)} == {"SENT"}
    assert {r.attempts for r in outbox_rows(storage)} == {0}
    storage.dispose()


async def test_a_cancelled_drain_records_what_went_out_and_gives_back_the_rest(
    app_storage: SqlStorage,
) -> None:
    """Cancelled while its 3rd publish hangs (round 2 waiting to be recorded, round 4 claimed
    ahead): round 2 is recorded anyway, rounds 3 and 4 are given back at once (no key stays
    claimed until its claim expires), and a new drain sends exactly what is left."""
    storage = app_storage
    keys = [f"k{i:02d}" for i in range(16)]
    _commit(storage, keys, 3)
    hanging = anyio.Event()

    async def hang_at_3rd(call: int) -> None:
        if call == 3:
            hanging.set()
            await anyio.sleep_forever()

    broker = Recording(InMemoryBroker(), hang_at_3rd)
    relay = OutboxWorker(storage, broker, batch_keys=4, batch_events=3, claim_seconds=600)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.drain)
        await hanging.wait()
        tg.cancel_scope.cancel()
    assert len(broker.acked) == 24  # rounds 1 and 2: 4 keys x 3 events each
    rows = outbox_rows(storage)
    assert {r.event_id for r in rows if r.status == "SENT"} == {m.event_id for m in broker.acked}
    assert _claimed_keys(storage) == []
    broker.hook = None
    assert await relay.drain() == 16 * 3 - 24
    assert order_problems(broker.pairs(), _in_seq_order(storage)) == []
    assert len(broker.pairs()) == 16 * 3  # nothing twice
