"""End to end with each real broker and both storages.

Application transactions on PostgreSQL or SQLite append events with ``storage.append_outbox``
next to their own changes; an ``OutboxWorker`` relays them to Kafka (tansu), RabbitMQ, Redis
Streams or the in-memory broker; a ``ConsumerRunner`` receives them. Every committed event
arrives exactly as written, each key in commit order; a rolled-back transaction publishes
nothing. A saga's step and compensation events reach a real broker through the optimistic path
alone (no relay runs).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select

from saga_core import (
    ConsumerRunner,
    DeclarativeSaga,
    OutboxEvent,
    OutboxWorker,
    SagaFailed,
    SagaOrchestrator,
    StepContext,
    StepRejected,
    compensate,
    step,
)
from saga_storage import create_storage
from tests.outbox.app import (
    EVENT_TYPE,
    RolledBack,
    accounts,
    commit_events,
    create_app_tables,
    expected_order,
    make_event,
    order_problems,
    outbox_rows,
    witness,
)
from tests.outbox.conftest import Collector, Db, Target, wait_until_async

pytestmark = pytest.mark.anyio

STORAGES = ["sqlite", "postgresql"]
ALL_BROKERS = ["memory", "kafka", "rabbitmq", "redis"]
SERVER_BROKERS = ["kafka", "rabbitmq", "redis"]
ACCTS = ["acct-a", "acct-b", "acct-c"]


@pytest.fixture
def anyio_backend(db_kind: str) -> str:
    """Both event loops without doubling the matrix: SQLite under trio, PostgreSQL under
    asyncio."""
    return "trio" if db_kind == "sqlite" else "asyncio"


@pytest.mark.parametrize("shared_target", ALL_BROKERS, indirect=True)
@pytest.mark.parametrize("db_kind", STORAGES)
async def test_committed_events_arrive_intact_and_rolled_back_ones_never(
    db_kind: str, make_db: Callable[[str], Db], shared_target: Target
) -> None:
    db = make_db(db_kind)
    storage = create_storage(db.url)
    create_app_tables(storage.engine)
    broker = shared_target.open()
    topic = shared_target.names.topic("acct")
    group = shared_target.names.group("e2e")
    collector = Collector()
    runner = ConsumerRunner(broker, [topic], group, collector.handle, poll_timeout=0.2)
    committed: dict[str, OutboxEvent] = {}
    rolled_back: list[OutboxEvent] = []

    async def transaction(i: int, accts: list[str], *, rollback: bool = False) -> None:
        events = [make_event(topic, a, writer="e2e", n=i) for a in sorted(accts)]
        try:
            await anyio.to_thread.run_sync(
                partial(commit_events, storage, events, writer="e2e", rollback=rollback)
            )
        except RolledBack:
            rolled_back.extend(events)
            return
        assert not rollback
        committed.update((e.event_id, e) for e in events)

    relay = OutboxWorker(storage, broker, batch_keys=2, batch_events=3, poll_interval=0.05)
    try:
        async with anyio.create_task_group() as tg:
            # The consumer group first: RabbitMQ drops what no queue is bound for.
            await tg.start(runner.run)
            # Committed before any relay runs, one to three events per transaction (a key
            # may appear twice in one transaction).
            for i in range(8):
                await transaction(i, [ACCTS[i % 3], *ACCTS[: i % 3]])
            await transaction(8, ["acct-a", "acct-b"], rollback=True)
            tg.start_soon(relay.run)
            # Committed while the relay runs, with another rollback in the middle; every key
            # has committed events after the rolled-back ones.
            for i in range(9, 18):
                await transaction(i, [ACCTS[i % 3], "acct-c"] if i % 2 else [ACCTS[i % 3]])
                if i == 12:
                    await transaction(100, ["acct-a", "acct-b", "acct-c"], rollback=True)
                await anyio.sleep(0.02)
            await collector.wait_for(committed, 60, f"{shared_target.kind}/{db_kind} relay")
            # A consumer can see an event before its publisher recorded it sent.
            await wait_until_async(
                lambda: {r.status for r in outbox_rows(storage)} == {"SENT"},
                10,
                "the relay recording every event sent",
                lambda: repr(outbox_rows(storage)),
            )
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()

    try:
        # Every message is the event as committed: topic, key, value and headers.
        assert collector.messages, "nothing was received"
        for m in collector.messages:
            event = committed.get(m.event_id)
            assert event is not None, f"received an event that was never committed: {m!r}"
            assert m.topic == topic
            assert m.key == event.key
            assert m.headers["event_id"] == event.event_id
            assert m.headers["event_type"] == EVENT_TYPE
            assert m.headers["content-type"] == "application/json"
            assert m.headers["x-writer"] == "e2e"
            assert "saga_id" not in m.headers
            assert json.loads(m.value) == dict(event.payload)
            assert dict(m.headers) == event.message_headers()
            assert m.value == event.payload_json().encode()
        # Per key, in commit order (the application's own versions); no gaps.
        assert order_problems(collector.pairs(), expected_order(storage.engine)) == []
        # A rolled-back transaction left nothing: no message, no outbox row, no app change.
        gone = {e.event_id for e in rolled_back}
        assert len(gone) == 5
        assert not gone & collector.ids()
        rows = outbox_rows(storage)
        assert not gone & {r.event_id for r in rows}
        with storage.engine.connect() as conn:
            assert not gone & set(conn.execute(select(witness.c.event_id)).scalars())
            versions = dict(conn.execute(select(accounts.c.acct, accounts.c.version)).all())
            per_acct = dict(
                conn.execute(select(witness.c.acct, func.count()).group_by(witness.c.acct)).all()
            )
        assert versions == per_acct  # the rollbacks' version bumps are gone too
        # The outbox: exactly the committed events, all sent, each published once.
        assert sorted(r.event_id for r in rows) == sorted(committed)
        assert {r.status for r in rows} == {"SENT"}
        assert {r.topic for r in rows} == {topic}
        assert relay.published == len(committed)
        stats = await storage.outbox_stats()
        assert (stats.pending, stats.dead, stats.blocked_keys) == (0, 0, 0)
    finally:
        storage.dispose()


def _order_saga(topic: str) -> type[DeclarativeSaga]:
    """reserve -> charge (sync) -> ship; ship refuses cleanly when asked (``no_courier``)."""

    class E2eOrder(DeclarativeSaga):
        saga_type = f"outbox-e2e-{topic}"

        @step(topic=topic)
        async def reserve(self, ctx: StepContext) -> dict[str, Any]:
            return {"reserved": ctx["qty"]}

        @compensate("reserve")
        async def release(self, ctx: StepContext) -> None:
            pass

        @step(depends_on=["reserve"], topic=topic)
        def charge(self, ctx: StepContext) -> dict[str, Any]:
            return {"charged": ctx["amount"]}

        @compensate("charge")
        async def refund(self, ctx: StepContext) -> None:
            pass

        @step(depends_on=["charge"], topic=topic)
        async def ship(self, ctx: StepContext) -> dict[str, Any]:
            if ctx.get("no_courier"):
                raise StepRejected("no courier")
            return {"tracking": "T-1"}

    return E2eOrder


@pytest.mark.parametrize("shared_target", SERVER_BROKERS, indirect=True)
@pytest.mark.parametrize("db_kind", STORAGES)
async def test_saga_events_reach_a_real_broker_through_the_optimistic_path(
    db_kind: str, make_db: Callable[[str], Db], shared_target: Target
) -> None:
    db = make_db(db_kind)
    storage = create_storage(db.url)
    broker = shared_target.open()
    topic = shared_target.names.topic("saga")
    group = shared_target.names.group("sagas")
    saga = _order_saga(topic)
    collector = Collector()
    runner = ConsumerRunner(broker, [topic], group, collector.handle, poll_timeout=0.2)
    ok, rejected = f"ok-{uuid.uuid4().hex[:8]}", f"rej-{uuid.uuid4().hex[:8]}"
    many = [f"many-{i}-{uuid.uuid4().hex[:8]}" for i in range(20)]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            # Not opened with ``async with``: no relay runs, only the optimistic path publishes.
            orchestrator = SagaOrchestrator(storage, broker)
            result = await orchestrator.execute(saga, {"qty": 2, "amount": 10}, saga_id=ok)
            assert result["tracking"] == "T-1"
            with pytest.raises(SagaFailed):
                await orchestrator.execute(
                    saga, {"qty": 1, "amount": 5, "no_courier": True}, saga_id=rejected
                )
            # Many at once: their publishes share broker calls (saga_core._publish_batches).
            async with anyio.create_task_group() as many_tg:
                for sid in many:
                    many_tg.start_soon(
                        partial(orchestrator.execute, saga, {"qty": 1, "amount": 1}, saga_id=sid)
                    )
            rows = outbox_rows(storage)
            assert len(rows) == 7 + 3 * len(many)
            await collector.wait_for(
                [r.event_id for r in rows], 60, f"saga events on {shared_target.kind}"
            )
            # Sent, and recorded as sent, without any relay.
            await wait_until_async(
                lambda: {r.status for r in outbox_rows(storage)} == {"SENT"},
                10,
                "the optimistic path marking its events sent",
                lambda: repr(outbox_rows(storage)),
            )
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()
        storage.dispose()

    by_saga: dict[str, list[str]] = {key: [] for key in (ok, rejected, *many)}
    for m in collector.messages:
        assert m.topic == topic
        assert m.headers["saga_id"] == m.key, m
        assert m.headers["content-type"] == "application/json"
        body = json.loads(m.value)
        assert body["saga_id"] == m.key
        assert m.headers["event_type"].startswith(body["step"] + "_")
        if m.event_id not in {e for k in by_saga for e in by_saga[k]}:
            by_saga[m.key].append(m.event_id)
    types = {m.event_id: m.headers["event_type"] for m in collector.messages}
    assert [types[e] for e in by_saga[ok]] == [
        "reserve_completed",
        "charge_completed",
        "ship_completed",
    ]
    assert [types[e] for e in by_saga[rejected]] == [
        "reserve_completed",
        "charge_completed",
        "charge_compensated",
        "reserve_compensated",
    ]
    for sid in many:
        assert [types[e] for e in by_saga[sid]] == [
            "reserve_completed",
            "charge_completed",
            "ship_completed",
        ]
    # Keyed by saga id, in the sequence the outbox gave them.
    assert by_saga == {key: [r.event_id for r in rows if r.key == key] for key in by_saga}
