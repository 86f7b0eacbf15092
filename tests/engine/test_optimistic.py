"""The optimistic publisher: events go out right after commit, and never out of key order."""

from __future__ import annotations

import json
import uuid

import anyio
import pytest
from sqlalchemy import event, select

from saga_brokers import InMemoryBroker
from saga_core import OptimisticPublisher, OutboxEvent, OutboxWorker, SagaOrchestrator
from saga_core.records import ClaimedKey
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


async def test_one_transaction_claims_every_free_key_whose_next_event_it_holds(
    storage: SqlStorage,
) -> None:
    broker = InMemoryBroker()
    publisher = OptimisticPublisher(storage, broker)
    with storage.engine.begin() as conn:  # key "c" gets an event nobody publishes yet
        storage.append_outbox(_event("c", 0), conn=conn)
    with storage.engine.begin() as conn:
        events = [_event("a", 1), _event("b", 1), _event("a", 2), _event("c", 1)]
        claims = storage.append_outbox_many(events, conn=conn, claim=True)
    # "a" with both its events and "b" are claimed, under one token; "c" is not (its event 0
    # goes first, by the relay).
    assert sorted((c.key, [e.seq for e in c.events]) for c in claims) == [
        ("a", [1, 2]),
        ("b", [1]),
    ]
    assert len({c.token for c in claims}) == 1
    assert await publisher.publish(claims) == 3
    assert await OutboxWorker(storage, broker).drain() == 2  # "c": 0, then 1
    sent = [(m.key, json.loads(m.value)["n"]) for m in broker.messages()]
    for key in "abc":
        got = [n for k, n in sent if k == key]
        assert got == sorted(got) and len(got) == (1 if key == "b" else 2), sent


async def test_concurrent_completions_share_transactions_and_get_their_own_follow_ups(
    storage: SqlStorage,
) -> None:
    n = 20
    keys = [f"f{i:02d}" for i in range(n)]
    with storage.engine.begin() as conn:
        claims = storage.append_outbox_many([_event(k, 1) for k in keys], conn=conn, claim=True)
    assert sorted(c.key for c in claims) == keys
    with storage.engine.begin() as conn:  # committed while the claims are held: follow-ups
        storage.append_outbox_many([_event(k, 2) for k in keys[::2]], conn=conn)
    commits: list[int] = []

    def on_commit(conn: object) -> None:
        commits.append(1)

    event.listen(storage.engine, "commit", on_commit)
    got: dict[str, list[ClaimedKey]] = {}

    async def complete(claim: ClaimedKey) -> None:
        got[claim.key] = await storage.complete_outbox_many(
            [(claim, 1, None)], retry_in=0.0, dead_after=3, follow=10
        )

    async with anyio.create_task_group() as tg:
        for claim in claims:
            tg.start_soon(complete, claim)
    event.remove(storage.engine, "commit", on_commit)
    assert len(commits) < n, "each completion took a transaction of its own"
    for key in keys:
        follow = got[key]
        if key in keys[::2]:  # its own next event, under its own claim
            assert [(c.key, [e.seq for e in c.events]) for c in follow] == [(key, [2])]
        else:
            assert follow == []
    with storage.engine.connect() as conn:
        okey = storage.tables.outbox_key
        rows = conn.execute(select(okey.c.key, okey.c.sent_seq, okey.c.claim_token)).all()
    token = claims[0].token
    for key, sent_seq, claim_token in rows:
        # Sent and released, or sent and still held for its follow-up.
        assert sent_seq == 1
        assert claim_token == (token if key in keys[::2] else None), key


async def test_concurrent_sagas_publish_each_event_once_in_step_order(storage: SqlStorage) -> None:
    broker = InMemoryBroker()
    orch = SagaOrchestrator(storage, broker)
    ids = [f"many-{uuid.uuid4().hex[:8]}" for _ in range(40)]
    async with anyio.create_task_group() as tg:
        for sid in ids:
            tg.start_soon(lambda sid=sid: orch.execute(OrderSaga(), {"amount": 1}, saga_id=sid))
    steps = ["create_order_completed", "charge_payment_completed", "ship_completed"]
    by_key: dict[str, list[str]] = {}
    for m in broker.messages():
        by_key.setdefault(m.key, []).append(m.headers["event_type"])
    assert by_key == {sid: steps for sid in ids}  # once each, in order, nothing else
    assert _statuses(storage) == ["SENT"] * 3 * len(ids)
    assert await OutboxWorker(storage, broker).drain() == 0
