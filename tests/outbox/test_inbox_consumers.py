"""The consumer side with real brokers: duplicates, even concurrent ones, apply once.

Every handler writes a ledger row (no unique constraint: a second application would be a
second row) and a balance, in the ``Inbox``'s own transaction on PostgreSQL.

- In the test process: two ``ConsumerRunner`` members of one group, each through
  ``inbox.wrap(handler)``, receive every event two or three times (the relay's publish, then
  the republish of a relay that died before recording), and a handler that fails after writing
  on an event's first try.
- Consumer processes (``python -m tests.outbox.app consumer``): one SIGKILLs itself after
  committing an event and before acknowledging it, and its successor gets that event again;
  one is frozen (SIGSTOP) in the middle of its inbox transaction until the broker hands its
  messages to the other member, which then races it on the same event (its inbox insert
  waits on the frozen transaction's row, seen in ``pg_stat_activity``).
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any

import anyio
import pytest
from sqlalchemy import Connection, func, select

from saga_core import ConsumerRunner, Inbox, Message, OutboxWorker, RetryPolicy
from saga_core.outbox import to_message
from saga_storage import SqlStorage, create_storage
from tests.outbox.app import (
    _apply,
    balances,
    commit_events,
    create_app_tables,
    deliveries,
    ledger,
    make_event,
)
from tests.outbox.conftest import Db, Procs, Target, sessions, wait_until_async

pytestmark = pytest.mark.anyio

BROKERS = ["kafka", "rabbitmq", "redis"]
ACCTS = ["acct-a", "acct-b", "acct-c", "acct-d"]


async def _commit_and_relay(storage: SqlStorage, broker: Any, topic: str, n: int) -> list[str]:
    """Commit ``n`` events (one per transaction) and relay them; their ids."""
    ids = []
    for i in range(n):
        event = make_event(topic, ACCTS[i % len(ACCTS)], writer="test", n=i)
        await anyio.to_thread.run_sync(partial(commit_events, storage, [event], writer="test"))
        ids.append(event.event_id)
    assert await OutboxWorker(storage, broker).drain() == n
    return ids


def _effects(storage: SqlStorage) -> dict[str, Any]:
    """What the consumers did: ledger rows per event, balances, inbox rows."""
    inbox = storage.tables.inbox
    with storage.engine.connect() as conn:
        rows = Counter(conn.execute(select(ledger.c.event_id)).scalars())
        totals = dict(conn.execute(select(balances.c.acct, balances.c.total)).all())
        inbox_rows = conn.execute(select(func.count()).select_from(inbox)).scalar_one()
    return {"ledger": rows, "balances": totals, "inbox": inbox_rows}


def _expected_totals(storage: SqlStorage, ids: Sequence[str]) -> dict[str, int]:
    outbox = storage.tables.outbox
    totals: dict[str, int] = Counter()
    with storage.engine.connect() as conn:
        for key, payload in conn.execute(
            select(outbox.c.key, outbox.c.payload).where(outbox.c.event_id.in_(list(ids)))
        ):
            totals[key] += json.loads(payload)["amount"]
    return dict(totals)


def _deliveries(storage: SqlStorage) -> list[Any]:
    with storage.engine.connect() as conn:
        return list(conn.execute(select(deliveries).order_by(deliveries.c.id)).all())


@pytest.mark.parametrize("shared_target", BROKERS, indirect=True)
async def test_runners_through_an_inbox_apply_every_duplicate_once(
    shared_target: Target, pg_db: Db
) -> None:
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    broker = shared_target.open()
    topic = shared_target.names.topic("acct")
    group = shared_target.names.group("billing")
    inbox = Inbox(storage, group)
    calls: Counter[str] = Counter()
    applied: list[str] = []

    def apply(conn: Connection, message: Message) -> None:
        calls[message.event_id] += 1
        _apply("runner", 0.02, conn, message)
        if calls[message.event_id] == 1 and sum(map(ord, message.event_id)) % 3 == 0:
            # Fails after writing: nothing of it may stay, and the retry applies it.
            raise RuntimeError("handler crashed half-way")
        applied.append(message.event_id)

    fast = RetryPolicy(max_attempts=5, backoff=0.01, jitter=0)
    runners = [
        ConsumerRunner(broker, [topic], group, inbox.wrap(apply), name=name, retry=fast,
                       poll_timeout=0.2, batch_size=10)
        for name in ("member-1", "member-2")
    ]  # fmt: skip
    try:
        async with anyio.create_task_group() as tg:
            for runner in runners:
                await tg.start(runner.run)  # the group exists before anything is published
            ids = await _commit_and_relay(storage, broker, topic, 40)
            # A relay that died after publishing, before recording, publishes them again; and
            # some a third time.
            outbox = storage.tables.outbox
            with storage.engine.connect() as conn:
                rows = conn.execute(select(outbox).order_by(outbox.c.id)).all()
            again = [to_message(r.topic, r.key, r.payload, json.loads(r.headers)) for r in rows]
            assert await broker.publish(again) == [None] * len(again)
            assert await broker.publish(again[::4]) == [None] * len(again[::4])
            total = len(again) + len(again[::4]) + len(ids)
            await wait_until_async(
                lambda: sum(r.handled for r in runners) >= total,
                60,
                f"handling all {total} deliveries",
                lambda: f"handled {[r.handled for r in runners]}",
            )
            tg.cancel_scope.cancel()
        effects = _effects(storage)
        totals = _expected_totals(storage, ids)
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()
        storage.dispose()

    assert sum(r.handled for r in runners) == total
    assert sum(r.dead_lettered for r in runners) == 0
    # Each event applied exactly once; the failed half-way tries left nothing behind.
    assert effects["ledger"] == Counter(dict.fromkeys(ids, 1))
    assert effects["balances"] == totals
    assert effects["inbox"] == len(ids)
    assert sorted(applied) == sorted(ids)
    assert any(n > 1 for n in calls.values()), "no handler failure was injected"


def _consumer_args(db: Db, target: Target, topic: str, group: str, name: str) -> list[str]:
    assert db.schema is not None
    return [
        "--db", db.url, "--broker", target.url, "--topic", topic, "--group", group,
        "--name", name, "--app-name", f"{db.schema}-{name}",
    ]  # fmt: skip


@pytest.mark.parametrize("shared_target", BROKERS, indirect=True)
async def test_consumer_killed_between_commit_and_ack_applies_nothing_twice(
    shared_target: Target, pg_db: Db, procs: Procs
) -> None:
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    broker = shared_target.open()
    topic = shared_target.names.topic("acct")
    group = shared_target.names.group("billing")
    try:
        # Join the group (RabbitMQ: declare its queue) before publishing.
        consumer = await broker.consumer([topic], group, name="setup")
        await consumer.aclose()
        ids = await _commit_and_relay(storage, broker, topic, 12)
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()
    try:
        c1 = procs.start(
            "c1", "consumer", *_consumer_args(pg_db, shared_target, topic, group, "c1"),
            "--die-after-commit", "5",
        )  # fmt: skip
        rc = await anyio.to_thread.run_sync(partial(c1.wait, 60))
        assert rc == -signal.SIGKILL, procs.tail("c1")
        procs.killed.add(c1.pid)  # it killed itself, as asked
        procs.start("c2", "consumer", *_consumer_args(pg_db, shared_target, topic, group, "c2"))

        def all_applied() -> bool:
            return sum(_effects(storage)["ledger"].values()) >= len(ids)

        await wait_until_async(
            all_applied, 60, "the successor applying the rest", lambda: procs.tail("c2")
        )
        # The event c1 committed last, and never acknowledged, comes to c2 again.
        with storage.engine.connect() as conn:
            last = conn.execute(
                select(ledger.c.event_id).where(ledger.c.consumer == "c1").order_by(ledger.c.id)
            ).all()[-1][0]

        def redelivered() -> bool:
            return any(
                d.event_id == last and d.consumer == "c2" and not d.applied
                for d in _deliveries(storage)
            )

        await wait_until_async(
            redelivered, 30, f"event {last} coming back to c2", lambda: procs.tail("c2")
        )
        assert procs.stop("c2") == 0
        effects = _effects(storage)
        totals = _expected_totals(storage, ids)
    finally:
        storage.dispose()
    assert procs.unexpected() == []
    assert effects["ledger"] == Counter(dict.fromkeys(ids, 1))
    assert effects["balances"] == totals
    assert effects["inbox"] == len(ids)


@pytest.mark.slow
@pytest.mark.parametrize("shared_target", BROKERS, indirect=True)
async def test_frozen_consumer_races_its_successor_and_the_effect_happens_once(
    shared_target: Target, pg_db: Db, procs: Procs
) -> None:
    assert pg_db.schema is not None
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    broker = shared_target.open()
    topic = shared_target.names.topic("acct")
    group = shared_target.names.group("billing")
    # c1 holds each inbox transaction open for a second; RabbitMQ must notice a frozen
    # process: heartbeats every second.
    c1_target = shared_target
    if shared_target.kind == "rabbitmq":
        c1_target = Target("rabbitmq", f"{shared_target.url}&heartbeat=1", shared_target.names)
    c1_name, c2_name = f"{pg_db.schema}-c1", f"{pg_db.schema}-c2"

    def state(name: str) -> list[tuple[str, str | None]]:
        """(state, wait_event_type) of each session of ``name``; a session inside an inbox
        transaction, after the handler's writes (sleeping in ``--hold``), shows as "holding"."""
        return [
            (
                "holding"
                if s["state"] == "idle in transaction"
                and s["query"].startswith("INSERT INTO app_balances")
                else s["state"],
                s["wait_event_type"],
            )
            for s in sessions(pg_db)
            if s["application_name"] == name
        ]

    try:
        procs.start(
            "c1", "consumer", *_consumer_args(pg_db, c1_target, topic, group, "c1"),
            "--hold", "1.0",
        )  # fmt: skip
        await anyio.to_thread.run_sync(procs.wait_ready, "c1")
        ids = await _commit_and_relay(storage, broker, topic, 6)
        # Freeze c1 inside an inbox transaction (its row inserted, not committed).
        with anyio.fail_after(30):
            while True:
                await anyio.sleep(0.02)
                if not any(st == "holding" for st, _ in state(c1_name)):
                    continue
                procs.signal("c1", signal.SIGSTOP)
                if any(st == "holding" for st, _ in state(c1_name)):
                    break
                procs.signal("c1", signal.SIGCONT)  # it committed meanwhile: try again
        procs.start("c2", "consumer", *_consumer_args(pg_db, shared_target, topic, group, "c2"))
        # The broker gives c1's messages to c2, whose inbox insert of the event c1 holds waits
        # for c1's transaction: a concurrent duplicate.
        await wait_until_async(
            lambda: any(w == "Lock" for _, w in state(c2_name)),
            40,
            "c2 waiting on the inbox row of the event frozen c1 holds",
            lambda: f"c2: {state(c2_name)}\n{procs.tail('c2')}",
        )
        procs.signal("c1", signal.SIGCONT)

        def raced() -> list[str]:
            by_event: dict[str, set[tuple[str, bool]]] = {}
            for d in _deliveries(storage):
                by_event.setdefault(d.event_id, set()).add((d.consumer, d.applied))
            return [e for e, s in by_event.items() if {("c1", True), ("c2", False)} <= s]

        await wait_until_async(
            lambda: bool(raced()) and sum(_effects(storage)["ledger"].values()) >= len(ids),
            60,
            "every event applied, the raced one by c1 only",
            lambda: f"{_deliveries(storage)}\n{procs.tail('c1')}\n{procs.tail('c2')}",
        )
        await anyio.sleep(1.5)  # c1 finishes what it was handling; nothing more may apply
        exits = procs.stop_all(["c1", "c2"])
        assert exits == {"c1": 0, "c2": 0}, procs.tail("c1") + procs.tail("c2")
        effects = _effects(storage)
        totals = _expected_totals(storage, ids)
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()
        storage.dispose()
    assert procs.unexpected() == []
    assert effects["ledger"] == Counter(dict.fromkeys(ids, 1))
    assert effects["balances"] == totals
    assert effects["inbox"] == len(ids)
