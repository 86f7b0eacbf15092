"""The outbox on real storage: application events, per-key order, refusals and outages."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Column, MetaData, String, Table, select

from saga_brokers import InMemoryBroker
from saga_core import BrokerUnavailable, Message, OutboxEvent, OutboxWorker, PublishFailed
from saga_storage import SqlStorage

pytestmark = pytest.mark.anyio

_md = MetaData()
ORDERS = Table("test_orders", _md, Column("id", String(50), primary_key=True))


def _event(key: str, n: int) -> OutboxEvent:
    return OutboxEvent(
        aggregate_type="order", aggregate_id=key, event_type="order_changed", payload={"n": n}
    )


def _statuses(storage: SqlStorage) -> dict[str, int]:
    with storage.engine.connect() as conn:
        rows = conn.execute(select(storage.tables.outbox.c.status)).scalars().all()
    return {s: rows.count(s) for s in set(rows)}


async def test_committed_events_are_relayed_rolled_back_are_not(
    storage: SqlStorage, broker: InMemoryBroker
) -> None:
    _md.create_all(storage.engine)
    with storage.engine.begin() as conn:
        conn.execute(ORDERS.insert().values(id="o-1"))
        storage.append_outbox(_event("o-1", 1), conn=conn)
    with pytest.raises(RuntimeError), storage.engine.begin() as conn:
        conn.execute(ORDERS.insert().values(id="o-2"))
        storage.append_outbox(_event("o-2", 1), conn=conn)
        raise RuntimeError("application failed after writing")
    assert await OutboxWorker(storage, broker).drain() == 1
    msgs = broker.messages("order")
    assert [(m.key, json.loads(m.value)) for m in msgs] == [("o-1", {"n": 1})]
    assert msgs[0].headers["event_type"] == "order_changed"
    assert await OutboxWorker(storage, broker).drain() == 0  # nothing twice


async def test_append_outbox_needs_a_transaction_and_an_event(storage: SqlStorage) -> None:
    with storage.engine.connect() as conn:
        with pytest.raises(ValueError, match="inside a transaction"):
            storage.append_outbox(_event("k", 1), conn=conn)
        with pytest.raises(TypeError, match="OutboxEvent"):
            storage.append_outbox({"event_type": "x"}, conn=conn)  # type: ignore[arg-type]


def test_bad_events_are_refused_at_construction() -> None:
    with pytest.raises(TypeError, match=r"payload\['x'\]"):
        OutboxEvent(aggregate_id="k", event_type="t", payload={"x": {1, 2}})
    with pytest.raises(ValueError, match="event_type"):
        OutboxEvent(aggregate_id="k", payload={})
    with pytest.raises(ValueError, match="aggregate_id"):
        OutboxEvent(event_type="t")
    with pytest.raises(TypeError, match="aggregate_id must be a str, got int"):
        OutboxEvent(aggregate_id=5, event_type="t")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="topic must be a str, got bytes"):
        OutboxEvent(aggregate_id="k", event_type="t", topic=b"orders")  # type: ignore[arg-type]


#: Any non-empty text: lone surrogates (which no database column or broker key can hold) drawn
#: as often as all other characters together (they are rare among all code points), and NULs
#: (which no PostgreSQL text column holds) often.
_ANY_TEXT = st.lists(
    st.one_of(
        st.characters(codec=None, exclude_categories=()),
        st.characters(categories=["Cs"]),
        st.just("\x00"),
    ),
    min_size=1,
    max_size=6,
).map("".join)
_TEXT_PLACES = ["aggregate_type", "aggregate_id", "event_type", "topic", "saga_id", "event_id"]


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@given(
    place=st.sampled_from([*_TEXT_PLACES, "header key", "header value"]),
    text=_ANY_TEXT,
)
def test_an_event_holds_text_exactly_when_it_can_be_stored_and_sent(place: str, text: str) -> None:
    """Every text an event carries is refused at construction, naming its place, exactly when
    it cannot be encoded as UTF-8 or, for a text stored as a column (headers are stored as
    JSON, which escapes it), holds a NUL: never later, when the database would refuse the
    whole transaction or a broker the message on every retry. (That such events do commit
    and arrive intact: the test below, on each database.)"""
    fields: dict[str, object] = {"aggregate_id": "k", "event_type": "t"}
    in_header = place.startswith("header")
    if place == "header key":
        fields["headers"] = {text: "v"}
    elif place == "header value":
        fields["headers"] = {"h": text}
    else:
        fields[place] = text
    if _utf8(text) and (in_header or "\x00" not in text):
        event = OutboxEvent(**fields)  # type: ignore[arg-type]
        assert text in {*event.message_headers().keys(), *event.message_headers().values()} | {
            event.resolved_topic,
            event.key,
            event.aggregate_type,
        }
    else:
        with pytest.raises(ValueError, match=r"not valid Unicode text|NUL") as refused:
            OutboxEvent(**fields)  # type: ignore[arg-type]
        assert (place.split()[0] if in_header else place) in str(refused.value)


async def test_any_text_an_event_accepts_commits_and_arrives_intact(
    storage: SqlStorage, broker: InMemoryBroker
) -> None:
    """The other half of the property above, on the real database: text at the edge of what
    is accepted (astral and combining characters, a NUL inside headers) is stored and
    published unchanged."""
    odd = "grüße-\U0001f680-e\u0301-\u202e"
    event = OutboxEvent(
        aggregate_type=f"order-{odd}",
        aggregate_id=f"key-{odd}",
        event_type=f"changed-{odd}",
        payload={"text": f"{odd}\x00\ud800"},  # the JSON text escapes these
        headers={f"h-{odd}": f"v\x00{odd}"},
    )
    with storage.engine.begin() as conn:
        storage.append_outbox(event, conn=conn)
    assert await OutboxWorker(storage, broker).drain() == 1
    [m] = broker.messages(event.resolved_topic)
    assert m.key == event.key
    assert m.headers[f"h-{odd}"] == f"v\x00{odd}"
    assert m.headers["event_type"] == event.event_type
    assert json.loads(m.value) == {"text": f"{odd}\x00\ud800"}


async def test_each_key_is_published_in_commit_order(
    storage: SqlStorage, broker: InMemoryBroker
) -> None:
    for n in range(30):
        with storage.engine.begin() as conn:
            storage.append_outbox(_event(f"k{n % 3}", n), conn=conn)
    worker = OutboxWorker(storage, broker, batch_keys=2, batch_events=4)
    assert await worker.drain() == 30
    for k in range(3):
        got = [json.loads(m.value)["n"] for m in broker.messages("order") if m.key == f"k{k}"]
        assert got == list(range(k, 30, 3))


class _RefusingBroker(InMemoryBroker):
    """Refuses messages whose payload has ``poison`` (as a broker refuses one too large), and,
    as the ``Broker`` contract requires, the later messages of the same key in the batch."""

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        refused: set[str] = set()
        results: list[BaseException | None] = []
        for m in messages:
            if m.key in refused or b"poison" in m.value:
                refused.add(m.key)
                results.append(PublishFailed("too large"))
            else:
                await super().publish([m])
                results.append(None)
        return results


async def test_refused_event_goes_dead_and_blocks_only_its_key(storage: SqlStorage) -> None:
    broker = _RefusingBroker()
    with storage.engine.begin() as conn:
        storage.append_outbox(_event("a", 1), conn=conn)
        storage.append_outbox(
            OutboxEvent(aggregate_id="a", event_type="x", payload={"poison": True}), conn=conn
        )
        storage.append_outbox(_event("a", 3), conn=conn)
        storage.append_outbox(_event("b", 1), conn=conn)
    worker = OutboxWorker(storage, broker, max_attempts=3, retry_backoff=0.0)
    assert await worker.drain() == 2  # a:1 and b:1; a:3 waits behind the dead event
    assert [json.loads(m.value) for m in broker.messages() if m.key == "a"] == [{"n": 1}]
    assert _statuses(storage) == {"SENT": 2, "DEAD": 1, "PENDING": 1}
    with storage.engine.connect() as conn:
        okey = storage.tables.outbox_key
        blocked = dict(conn.execute(select(okey.c.key, okey.c.blocked)).all())
        dead = conn.execute(
            select(storage.tables.outbox.c.attempts, storage.tables.outbox.c.last_error).where(
                storage.tables.outbox.c.status == "DEAD"
            )
        ).one()
    assert blocked == {"a": True, "b": False}
    assert dead.attempts == 3 and "too large" in dead.last_error


class _DownBroker(InMemoryBroker):
    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        raise BrokerUnavailable("connection refused")


async def test_broker_outage_consumes_no_attempts(storage: SqlStorage) -> None:
    with storage.engine.begin() as conn:
        storage.append_outbox(_event("a", 1), conn=conn)
    for _ in range(5):
        with pytest.raises(BrokerUnavailable):
            await OutboxWorker(storage, _DownBroker(), max_attempts=2).drain()
    with storage.engine.connect() as conn:
        attempts = conn.execute(select(storage.tables.outbox.c.attempts)).scalar_one()
    assert attempts == 0
    broker = InMemoryBroker()
    assert await OutboxWorker(storage, broker).drain() == 1  # the claim was given back at once
    assert _statuses(storage) == {"SENT": 1}


async def test_notify_wakes_an_idle_relay(pg_url: str) -> None:
    from saga_storage import create_storage

    storage = create_storage(pg_url, notify=True)
    broker = InMemoryBroker()
    # Polling every 60 s: only the NOTIFY sent by the committing writer can deliver in time.
    worker = OutboxWorker(storage, broker, poll_interval=60.0)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await anyio.sleep(0.5)  # the relay is idle, listening
            with storage.engine.begin() as conn:
                storage.append_outbox(_event("n", 1), conn=conn)
            with anyio.fail_after(10):
                while not broker.messages():
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    finally:
        storage.dispose()
    assert [json.loads(m.value) for m in broker.messages()] == [{"n": 1}]


def test_notify_needs_postgresql(tmp_path: Path) -> None:
    from saga_storage import create_storage

    with pytest.raises(ValueError, match="notify=True needs PostgreSQL"):
        create_storage(f"sqlite:///{tmp_path / 'x.db'}", notify=True)
