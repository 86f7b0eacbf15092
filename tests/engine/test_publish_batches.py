"""Concurrent optimistic publishes share broker calls, and none is lost when a caller stops."""

from __future__ import annotations

import json
from collections.abc import Sequence

import anyio
import pytest

from saga_brokers import InMemoryBroker
from saga_core import OptimisticPublisher, OutboxEvent, OutboxWorker
from saga_core._publish_batches import PublishBatches
from saga_core.events import Message
from saga_core.records import ClaimedKey
from saga_storage import SqlStorage

pytestmark = pytest.mark.anyio


class SlowBroker(InMemoryBroker):
    """An in-memory broker whose publishes take a round trip, and can be held at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.gate: anyio.Event | None = None

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        self.calls.append(len(messages))
        if self.gate is not None:
            await self.gate.wait()
        await anyio.sleep(0.01)
        return await super().publish(messages)


def _claim(storage: SqlStorage, key: str, n: int = 1) -> ClaimedKey:
    events = [
        OutboxEvent(aggregate_type="acct", aggregate_id=key, event_type="t", payload={"n": i})
        for i in range(1, n + 1)
    ]
    with storage.engine.begin() as conn:
        (claim,) = storage.append_outbox_many(events, conn=conn, claim=True)
    return claim


class Publishes:
    """Publishes claims one per call through ``publisher``, noting what each call returned."""

    def __init__(self, publisher: OptimisticPublisher) -> None:
        self.publisher = publisher
        self.got: dict[str, int] = {}

    async def one(self, claim: ClaimedKey) -> None:
        self.got[claim.key] = await self.publisher.publish([claim], committed=True)

    async def stoppable(self, claim: ClaimedKey, scope: anyio.CancelScope) -> None:
        """``one``, in a cancel scope the test cancels."""
        with scope:
            await self.one(claim)


def _sent(broker: InMemoryBroker) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for m in broker.messages():
        out.setdefault(m.key, []).append(json.loads(m.value)["n"])
    return out


async def test_concurrent_publishes_share_broker_calls_and_count_their_own(
    storage: SqlStorage,
) -> None:
    broker = SlowBroker()
    publisher = OptimisticPublisher(storage, broker)
    claims = [_claim(storage, f"a{i:02d}", n=1 + i % 3) for i in range(30)]
    publishes = Publishes(publisher)
    async with anyio.create_task_group() as tg:
        for claim in claims:
            tg.start_soon(publishes.one, claim)
    # The first publish went alone; those queued meanwhile went together.
    assert len(broker.calls) < len(claims), broker.calls
    assert publishes.got == {c.key: len(c.events) for c in claims}
    assert _sent(broker) == {c.key: [e.seq for e in c.events] for c in claims}
    assert publisher.published == sum(len(c.events) for c in claims)
    assert await OutboxWorker(storage, broker).drain() == 0


async def _until(check: object) -> None:
    with anyio.fail_after(5):
        while not check():  # type: ignore[operator]
            await anyio.sleep(0.005)


async def test_a_cancelled_leader_leaves_its_batch_to_the_relay_and_a_waiter_leads_on(
    storage: SqlStorage,
) -> None:
    storage.optimistic_claim_seconds = 0.3
    broker = SlowBroker()
    broker.gate = anyio.Event()
    publisher = OptimisticPublisher(storage, broker)
    first, second, third = (_claim(storage, k) for k in ("k1", "k2", "k3"))
    publishes, leader = Publishes(publisher), anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(publishes.stoppable, first, leader)
        await _until(lambda: broker.calls)  # the leader is in the broker, held at the gate
        tg.start_soon(publishes.one, second)
        tg.start_soon(publishes.one, third)
        await anyio.sleep(0.05)  # both queued behind it
        assert broker.calls == [1]
        leader.cancel()
        broker.gate.set()
    # The next caller led the rest in one call; the cancelled batch published nothing.
    assert publishes.got == {"k2": 1, "k3": 1}
    assert broker.calls == [1, 2]
    assert _sent(broker) == {"k2": [1], "k3": [1]}
    # Its claim expires and the relay sends the event, once.
    await anyio.sleep(0.35)
    assert await OutboxWorker(storage, broker).drain() == 1
    assert _sent(broker) == {"k1": [1], "k2": [1], "k3": [1]}


@pytest.mark.parametrize("another_waiter", [True, False])
async def test_claims_of_a_caller_that_stopped_waiting_are_still_published(
    storage: SqlStorage, another_waiter: bool
) -> None:
    broker = SlowBroker()
    broker.gate = anyio.Event()
    publisher = OptimisticPublisher(storage, broker)
    first, second = _claim(storage, "k1"), _claim(storage, "k2")
    publishes, waiter = Publishes(publisher), anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(publishes.one, first)
        await _until(lambda: broker.calls)
        tg.start_soon(publishes.stoppable, second, waiter)
        if another_waiter:
            tg.start_soon(publishes.one, _claim(storage, "k3"))
        await anyio.sleep(0.05)
        waiter.cancel()
        await anyio.sleep(0.01)
        broker.gate.set()
    # Whoever led next (the other waiter, or the leader before letting go) published them.
    expected = {"k1": 1, "k3": 1} if another_waiter else {"k1": 1}
    assert publishes.got == expected
    assert _sent(broker) == {k: [1] for k in ("k1", "k2", *(("k3",) if another_waiter else ()))}
    assert await OutboxWorker(storage, broker).drain() == 0


async def test_a_batch_carries_at_most_max_claims(storage: SqlStorage) -> None:
    broker = SlowBroker()
    broker.gate = anyio.Event()
    publisher = OptimisticPublisher(storage, broker)
    publisher._batches = PublishBatches("capped", publisher._publish_all, max_claims=5)
    claims = [_claim(storage, f"c{i:02d}") for i in range(13)]
    publishes = Publishes(publisher)
    async with anyio.create_task_group() as tg:
        tg.start_soon(publishes.one, claims[0])
        await _until(lambda: broker.calls)  # the first goes alone; twelve queue behind it
        for claim in claims[1:]:
            tg.start_soon(publishes.one, claim)
        await anyio.sleep(0.05)
        broker.gate.set()
    assert broker.calls == [1, 5, 5, 2]
    assert publishes.got == {c.key: 1 for c in claims}
