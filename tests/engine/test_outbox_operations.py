"""Outbox operations (stats, dead letters, replay, skip, prune) and the consumer Inbox."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, select, update

from saga_brokers import InMemoryBroker
from saga_core import Inbox, Message, OutboxEvent, OutboxWorker, PublishFailed
from saga_storage import SqlStorage

pytestmark = pytest.mark.anyio


def _append(storage: SqlStorage, key: str, n: int, poison: bool = False) -> None:
    payload: dict[str, Any] = {"n": n}
    if poison:
        payload["poison"] = True
    with storage.engine.begin() as conn:
        storage.append_outbox(
            OutboxEvent(aggregate_type="acct", aggregate_id=key, event_type="t", payload=payload),
            conn=conn,
        )


class _Refusing(InMemoryBroker):
    """Refuses poison messages (and, per the Broker contract, the rest of their key's batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = True

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        refused: set[str] = set()
        out: list[BaseException | None] = []
        for m in messages:
            if m.key in refused or (self.refuse and b"poison" in m.value):
                refused.add(m.key)
                out.append(PublishFailed("refused"))
            else:
                await super().publish([m])
                out.append(None)
        return out


def _ns(broker: InMemoryBroker, key: str) -> list[int]:
    return [json.loads(m.value)["n"] for m in broker.messages("acct") if m.key == key]


async def _dead_setup(storage: SqlStorage) -> _Refusing:
    for n, poison in ((1, False), (2, True), (3, False)):
        _append(storage, "a", n, poison)
    _append(storage, "b", 1)
    broker = _Refusing()
    await OutboxWorker(storage, broker, max_attempts=2, retry_backoff=0.0).drain()
    return broker


async def test_stats_and_dead_letters(storage: SqlStorage) -> None:
    await _dead_setup(storage)
    stats = await storage.outbox_stats()
    assert (stats.pending, stats.sent, stats.dead, stats.blocked_keys) == (1, 2, 1, 1)
    assert stats.oldest_pending_age is not None and stats.oldest_pending_age >= 0
    dead = await storage.dead_events()
    assert [(d.key, d.seq, d.attempts) for d in dead] == [("a", 2, 2)]
    assert dead[0].last_error is not None and "refused" in dead[0].last_error


async def test_replay_resumes_the_key_at_its_dead_event(storage: SqlStorage) -> None:
    broker = await _dead_setup(storage)
    broker.refuse = False  # the cause was fixed
    await storage.replay_key("a")
    assert await OutboxWorker(storage, broker).drain() == 2
    assert _ns(broker, "a") == [1, 2, 3]  # in order, nothing skipped
    assert (await storage.outbox_stats()).dead == 0
    with pytest.raises(LookupError, match="no dead event"):
        await storage.replay_key("a")


async def test_skip_is_the_way_past_a_dead_event(storage: SqlStorage) -> None:
    broker = await _dead_setup(storage)
    dead = (await storage.dead_events())[0]
    await storage.skip_event(dead.event_id, "poison payload, ticket OPS-1")
    assert await OutboxWorker(storage, broker).drain() == 1
    assert _ns(broker, "a") == [1, 3]  # 2 was skipped, never published
    with storage.engine.connect() as conn:
        note = conn.execute(
            select(storage.tables.outbox.c.last_error).where(
                storage.tables.outbox.c.event_id == dead.event_id
            )
        ).scalar_one()
    assert "OPS-1" in note
    with pytest.raises(LookupError):
        await storage.skip_event(dead.event_id, "again")


@pytest.mark.parametrize("seed", range(4))
async def test_dead_and_pending_events_found_through_their_keys_are_those_their_status_says(
    storage: SqlStorage, seed: int
) -> None:
    """The operations' queries find unsent events through the key table (the outbox has no
    index on status): after any mix of sends, partial sends, refusals, dead letters, replays
    and skips they list exactly what a scan by status lists."""
    import random

    rng = random.Random(seed)
    keys = [f"s{seed}k{i}" for i in range(6)]
    for i in range(40):
        _append(storage, rng.choice(keys), i)
    for _ in range(8):
        claims = await storage.claim_outbox("t", max_keys=3, max_events=4, claim_seconds=30)
        results = []
        for claim in claims:
            sent = rng.randint(0, len(claim.events))
            refused = sent < len(claim.events) and rng.random() < 0.7
            results.append((claim, sent, "refused" if refused else None))
        await storage.complete_outbox_many(results, retry_in=0.0, dead_after=1)
        dead = await storage.dead_events()
        if dead and rng.random() < 0.3:
            await storage.replay_key(dead[0].key)
        elif dead and rng.random() < 0.3:
            await storage.skip_event(dead[-1].event_id, "ops")
        if rng.random() < 0.3:
            _append(storage, rng.choice(keys), 100)
    outbox = storage.tables.outbox
    with storage.engine.connect() as conn:
        by_status = conn.execute(
            select(outbox.c.event_id).where(outbox.c.status == "DEAD").order_by(outbox.c.id)
        ).scalars()
        oldest = conn.execute(
            select(outbox.c.created_at)
            .where(outbox.c.status == "PENDING")
            .order_by(outbox.c.created_at)
        ).first()
        dead_ids = list(by_status)
        assert conn.execute(storage.sql.oldest_pending).scalar() == (oldest and oldest[0])
        for key in keys:
            mine = conn.execute(
                select(outbox.c.event_id).where(outbox.c.key == key, outbox.c.status == "DEAD")
            ).scalars()
            found = conn.execute(storage.sql.dead_of_key, {"b_key": key}).all()
            assert [r.event_id for r in found] == list(mine)
    assert [e.event_id for e in await storage.dead_events(limit=1000)] == dead_ids
    stats = await storage.outbox_stats()
    assert stats.dead == len(dead_ids)


async def test_prune_deletes_old_sent_rows_in_batches_and_keeps_order(
    storage: SqlStorage,
) -> None:
    for n in range(25):
        _append(storage, "k", n)
    broker = InMemoryBroker()
    assert await OutboxWorker(storage, broker).drain() == 25
    outbox = storage.tables.outbox
    with storage.engine.begin() as conn:  # made and sent an hour ago
        conn.execute(update(outbox).values(created_at=time.time() - 3601))
        conn.execute(update(outbox).values(sent_at=time.time() - 3600))
    assert await storage.prune_outbox(older_than=60, batch=10) == 25
    assert await storage.prune_outbox(older_than=60, batch=10) == 0
    _append(storage, "k", 25)  # the key's counters survived: its sequence goes on
    assert await OutboxWorker(storage, broker).drain() == 1
    assert _ns(broker, "k") == list(range(26))


async def test_prune_walks_only_up_to_events_newer_than_the_cutoff(storage: SqlStorage) -> None:
    """Pruning keeps unsent events and recent ones, and stops reading at the first window
    that reaches events created after the cutoff (it does not walk the rest of the table)."""
    broker = InMemoryBroker()
    for n in range(15):
        _append(storage, "a", n)
    with storage.engine.begin() as conn:  # claimed by a publisher that never publishes
        held = OutboxEvent(aggregate_type="acct", aggregate_id="held", event_type="t")
        assert storage.append_outbox(held, conn=conn, claim=True) is not None
    for n in range(15):
        _append(storage, "b", n)
    assert await OutboxWorker(storage, broker).drain() == 30
    outbox = storage.tables.outbox
    with storage.engine.begin() as conn:  # made and sent an hour ago
        conn.execute(update(outbox).values(created_at=time.time() - 3601))
        conn.execute(
            update(outbox).where(outbox.c.status == "SENT").values(sent_at=time.time() - 3600)
        )
    for n in range(25):
        _append(storage, "c", n)
    assert await OutboxWorker(storage, broker).drain() == 25
    windows: list[int] = []

    def count(conn: Any, clause: Any, *args: Any) -> None:
        if clause is storage.sql.prune_window:
            windows.append(1)

    event.listen(storage.engine, "before_execute", count)
    try:
        assert await storage.prune_outbox(older_than=60, batch=10) == 30
    finally:
        event.remove(storage.engine, "before_execute", count)
    # 56 rows in id order, 31 old then 25 new: the fourth window reaches the new ones.
    assert len(windows) == 4
    with storage.engine.connect() as conn:
        left = conn.execute(select(outbox.c.key, outbox.c.status)).all()
    assert sorted(left) == sorted([("held", "PENDING")] + [("c", "SENT")] * 25)


_md = MetaData()
COUNTS = Table(
    "test_inbox_counts",
    _md,
    Column("id", String(20), primary_key=True),
    Column("n", Integer, nullable=False),
)


def _message(event_id: str) -> Message:
    return Message("acct", "a", b"{}", {"event_id": event_id, "event_type": "t"})


def _bump(conn: Any, message: Message) -> None:
    time.sleep(0.05)  # widen the window for concurrent duplicates
    conn.execute(update(COUNTS).where(COUNTS.c.id == "x").values(n=COUNTS.c.n + 1))


async def test_inbox_applies_duplicates_once_even_concurrently(storage: SqlStorage) -> None:
    _md.create_all(storage.engine)
    with storage.engine.begin() as conn:
        conn.execute(COUNTS.insert().values(id="x", n=0))
    inbox = Inbox(storage, "billing")
    results: list[bool] = []

    async def deliver() -> None:
        results.append(await inbox.handle(_message("e-1"), _bump))

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(deliver)
    assert sorted(results) == [False] * 5 + [True]
    assert await inbox.handle(_message("e-1"), _bump) is False  # a later redelivery
    assert await Inbox(storage, "audit").handle(_message("e-1"), _bump) is True  # other consumer
    with storage.engine.connect() as conn:
        assert conn.execute(select(COUNTS.c.n)).scalar_one() == 2


async def test_inbox_failed_handler_records_nothing(storage: SqlStorage) -> None:
    _md.create_all(storage.engine)
    inbox = Inbox(storage, "billing")

    def boom(conn: Any, message: Message) -> None:
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        await inbox.handle(_message("e-2"), boom)
    calls: list[str] = []
    assert await inbox.handle(_message("e-2"), lambda c, m: calls.append(m.event_id)) is True
    assert calls == ["e-2"]  # the redelivery after the failure is processed
    with pytest.raises(ValueError, match="event_id"):
        await inbox.handle(Message("t", "k", b"{}", {}), boom)
