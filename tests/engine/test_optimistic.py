"""The optimistic publisher: events go out right after commit, and never out of key order."""

from __future__ import annotations

import json
import uuid

import anyio
import pytest
from sqlalchemy import select

from saga_brokers import InMemoryBroker
from saga_core import OptimisticPublisher, OutboxEvent, OutboxWorker, SagaOrchestrator
from saga_storage import SqlStorage
from tests.engine.sagas import OrderSaga

pytestmark = pytest.mark.anyio


def _event(key: str, n: int) -> OutboxEvent:
    return OutboxEvent(aggregate_type="acct", aggregate_id=key, event_type="t", payload={"n": n})


def _statuses(storage: SqlStorage) -> list[str]:
    with storage.engine.connect() as conn:
        return list(conn.execute(select(storage.tables.outbox.c.status)).scalars())


async def test_saga_events_are_published_right_after_each_commit(storage: SqlStorage) -> None:
    broker = InMemoryBroker()
    sid = f"opt-{uuid.uuid4().hex[:8]}"
    await SagaOrchestrator(storage, broker).execute(OrderSaga(), {"amount": 1}, saga_id=sid)
    # No relay ran: the optimistic path sent all three, in order, and marked them sent.
    assert [m.headers["event_type"] for m in broker.messages() if m.key == sid] == [
        "create_order_completed",
        "charge_payment_completed",
        "ship_completed",
    ]
    assert _statuses(storage) == ["SENT"] * 3
    assert await OutboxWorker(storage, broker).drain() == 0  # nothing left for the relay


async def test_optimistic_off_leaves_events_to_the_relay(storage: SqlStorage) -> None:
    broker = InMemoryBroker()
    orch = SagaOrchestrator(storage, broker, optimistic=False)
    await orch.execute(OrderSaga(), {"amount": 1})
    assert broker.messages() == []
    assert await OutboxWorker(storage, broker).drain() == 3


async def test_application_events_keep_key_order_across_both_paths(storage: SqlStorage) -> None:
    broker = InMemoryBroker()
    publisher = OptimisticPublisher(storage, broker)
    with storage.engine.begin() as conn:
        first = publisher.append_outbox(_event("k", 1), conn=conn)
    with storage.engine.begin() as conn:
        second = publisher.append_outbox(_event("k", 2), conn=conn)
    assert first is not None  # next in sequence, key free: claimed
    assert second is None  # event 1 not sent yet: only the relay may send 2, after it
    # The relay cannot overtake: key k is claimed by the optimistic publisher.
    assert await OutboxWorker(storage, broker).drain() == 0
    # Publishing 1 keeps the claim and follows with 2, committed meanwhile, in order.
    assert await publisher.publish([first, second]) == 2
    assert await OutboxWorker(storage, broker).drain() == 0
    assert [json.loads(m.value)["n"] for m in broker.messages()] == [1, 2]


async def test_rolled_back_transaction_publishes_nothing(storage: SqlStorage) -> None:
    broker = InMemoryBroker()
    publisher = OptimisticPublisher(storage, broker)
    claim = None
    with pytest.raises(RuntimeError), storage.engine.begin() as conn:
        claim = publisher.append_outbox(_event("r", 1), conn=conn)
        raise RuntimeError("rolled back")
    assert claim is not None  # it was claimed inside the transaction...
    assert await publisher.publish([claim]) == 0  # ...which rolled back: nothing goes out
    assert broker.messages() == []
    assert await OutboxWorker(storage, broker).drain() == 0


async def test_unpublished_claim_expires_and_the_relay_sends(storage: SqlStorage) -> None:
    broker = InMemoryBroker()
    storage.optimistic_claim_seconds = 0.2
    publisher = OptimisticPublisher(storage, broker)
    with storage.engine.begin() as conn:
        assert publisher.append_outbox(_event("x", 1), conn=conn) is not None
    # The writer died before publishing: after the claim expires the relay sends the event.
    assert await OutboxWorker(storage, broker).drain() == 0
    await anyio.sleep(0.3)
    assert await OutboxWorker(storage, broker).drain() == 1
