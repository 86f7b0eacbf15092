"""Outbox benchmark: N events committed, then relayed end to end, per storage and broker.

Per case (one storage, one broker, a fresh schema or file, topics of its own):

1. **commit**: ``storage.append_outbox_many`` inside application transactions of ``commit_batch``
   events (one key-sequence upsert per key and the rows, as DESIGN.md section 4 requires);
2. **relay**: ``OutboxWorker.drain()`` publishes them all and marks them sent; wall time and this
   process's CPU (the relay and the broker client's threads) are measured;
3. **check**: every event is ``SENT``, none pending, and the broker holds exactly as many
   messages as were committed (where the broker can count them);
4. **latency**: events committed one at a time while the relay runs (default polling), with and
   without ``OptimisticPublisher``; commit-to-broker is the time from the commit returning to
   the broker acknowledging the message.

The baselines of :mod:`benchmarks.baselines` are measured in the same case, on the same
messages.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio

from benchmarks._measure import Meter, percentile, rate
from benchmarks._servers import (
    BrokerTarget,
    Database,
    bind_rabbit_queue,
    broker_message_count,
    fresh_database,
    run_asyncio,
)
from benchmarks.baselines import raw_broker_rate, raw_db_rate, raw_rows
from saga_brokers import InMemoryBroker, create_broker
from saga_core import OptimisticPublisher, OutboxEvent, OutboxWorker
from saga_core.events import Message
from saga_core.ports import Broker
from saga_storage import SqlStorage, create_storage

#: Relay batch settings (OutboxWorker defaults): keys per claim, events per key per round.
BATCH_KEYS = 100
BATCH_EVENTS = 100
WARM_UP = 20


@dataclass(frozen=True)
class OutboxSizes:
    """How much each outbox case does."""

    events: int = 20_000
    per_key: int = 10
    commit_batch: int = 100
    latency_events: int = 500
    latency_gap: float = 0.005
    #: Times each relay case runs (a fresh schema or file each time, ours then its baselines):
    #: rates are the median over them, ratios the median of each run's own ratio.
    repeats: int = 3
    #: Events of the peer's outbox cases (sagaz relays ~1,000 ev/s here), if not ``events``.
    peer_events: int | None = None
    #: Events of our relay cases against RabbitMQ, if not ``events``: publisher confirms take
    #: 2,500-7,000 messages/s on the machines of docs/benchmarks.md, so its cases, ours and
    #: the raw client's three times each, took a fifth of a quick run at 5,000 events.
    rabbitmq_events: int | None = None

    @property
    def round_size(self) -> int:
        """Messages one relay round publishes (the raw baselines' batch)."""
        return min(self.events, BATCH_KEYS * min(self.per_key, BATCH_EVENTS))

    def for_broker(self, kind: str) -> OutboxSizes:
        """These sizes for a relay case against broker ``kind``."""
        if kind == "rabbitmq" and self.rabbitmq_events is not None:
            return replace(self, events=self.rabbitmq_events)
        return self


QUICK_OUTBOX = OutboxSizes(
    events=5_000, latency_events=100, repeats=3, peer_events=2_000, rabbitmq_events=2_000
)
FULL_OUTBOX = OutboxSizes()


def make_events(topic: str, n: int, per_key: int, prefix: str) -> list[OutboxEvent]:
    """``n`` events shaped like a saga step's (about 200 bytes), ``per_key`` per key."""
    return [
        OutboxEvent(
            aggregate_type="bench",
            aggregate_id=f"{prefix}-{i // per_key}",
            event_type="bench_step_completed",
            topic=topic,
            payload={
                "saga_id": f"{prefix}-{i // per_key}",
                "step": f"step_{i % per_key}",
                "result": {"order_id": i, "amount": 42.5, "currency": "EUR"},
                "occurred_at": "2025-01-01T00:00:00.000000+00:00",
            },
        )
        for i in range(n)
    ]


def as_messages(events: Sequence[OutboxEvent]) -> list[Message]:
    """The broker messages the relay sends for ``events``."""
    return [
        Message(e.resolved_topic, e.key, e.payload_json().encode(), e.message_headers())
        for e in events
    ]


def commit_events(storage: SqlStorage, events: Sequence[OutboxEvent], batch: int) -> None:
    """Append ``events`` in application transactions of ``batch`` events each, with
    ``append_outbox_many`` (what the raw baseline's ``executemany`` corresponds to)."""
    for s in range(0, len(events), batch):
        with storage.engine.begin() as conn:
            storage.append_outbox_many(events[s : s + batch], conn=conn)


async def _prepare_topic(target: BrokerTarget, topic: str) -> None:
    if target.kind == "rabbitmq":
        await anyio.to_thread.run_sync(run_asyncio, lambda: bind_rabbit_queue(target, topic))


async def relay_case(storage_kind: str, target: BrokerTarget, sizes: OutboxSizes) -> dict[str, Any]:
    """Commit then relay ``sizes.events`` events, with both baselines of this case measured
    right after; ``sizes.repeats`` times, combined by :func:`combine_runs`."""
    sizes = sizes.for_broker(target.kind)
    runs = []
    for _ in range(max(1, sizes.repeats)):
        with fresh_database(storage_kind) as db:
            runs.append(await _relay_case(db, target, sizes))
    return combine_runs(runs)


#: Ratios of a run to its own baselines, measured back to back: combined as the median of the
#: runs' ratios (not as a ratio of medians, which would pair numbers of different runs).
RATIOS = ("relay_vs_raw_broker", "e2e_vs_raw_db", "e2e_vs_lower_baseline")


def combine_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result for several runs of a case: numbers are medians, checks must hold in every
    run, and ``spread`` keeps each ratio's lowest and highest run."""
    combined = _median_of(runs)
    combined["consistent"] = all(r["consistent"] for r in runs)
    orders = [r["keys_in_order"] for r in runs]
    combined["keys_in_order"] = None if None in orders else all(orders)
    combined["runs"] = len(runs)
    # The counts of every run, so that a median can never hide an event lost in one of them.
    combined["counts_per_run"] = [{k: r[k] for k in _COUNTS} for r in runs]
    combined["spread"] = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in RATIOS}
    # The lower of the two reported baselines, not the median of each run's lower one: when the
    # two baselines swap places between runs, those differ, and the table would show a lower
    # baseline that is neither of the baselines beside it. (The ratio stays per run, above.)
    combined["lower_baseline"] = min(
        combined["raw_broker"]["rate"], combined["raw_db"]["insert_then_drain_rate"]
    )
    return combined


_COUNTS = ("relayed", "sent", "pending", "dead", "on_broker", "keys_in_order", "consistent")


def _median_of(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        if isinstance(first, dict):
            out[key] = _median_of(values)
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = statistics.median(values)
        else:
            out[key] = first
    return out


async def _relay_case(db: Database, target: BrokerTarget, sizes: OutboxSizes) -> dict[str, Any]:
    storage = create_storage(db.url)
    broker = create_broker(target.url)
    try:
        topic = target.new_topic("relay")
        await _prepare_topic(target, topic)
        # Warm-up: connections, the Kafka topic, the statement caches.
        warm = make_events(topic, WARM_UP, sizes.per_key, "warm")
        await anyio.to_thread.run_sync(commit_events, storage, warm, sizes.commit_batch)
        await OutboxWorker(storage, broker).drain()

        events = make_events(topic, sizes.events, sizes.per_key, "k")
        with Meter() as commit:
            await anyio.to_thread.run_sync(commit_events, storage, events, sizes.commit_batch)
        worker = OutboxWorker(storage, broker, batch_keys=BATCH_KEYS, batch_events=BATCH_EVENTS)
        with Meter() as relay:
            relayed = await worker.drain()
        counts = await storage.outbox_counts()
        in_order: bool | None = None
        if isinstance(broker, InMemoryBroker):
            on_broker: int | None = len(broker.messages(topic))
            in_order = _keys_in_order(broker.messages(topic)[WARM_UP:], events)
        else:
            on_broker = await anyio.to_thread.run_sync(
                broker_message_count, target, topic, sizes.events + WARM_UP
            )
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()
            await storage.aclose()
    expected = sizes.events + WARM_UP
    consistent = (
        relayed == sizes.events
        and counts.get("SENT", 0) == expected
        and counts.get("PENDING", 0) == 0
        and counts.get("DEAD", 0) == 0
        and (on_broker is None or on_broker == expected)
        and in_order is not False
    )
    messages = as_messages(events)
    seqs = [i % sizes.per_key + 1 for i in range(len(events))]
    raw_b = await raw_broker_rate(target, messages, sizes.round_size)
    raw_d = await anyio.to_thread.run_sync(
        raw_db_rate, db, raw_rows(messages, seqs), sizes.commit_batch, sizes.round_size
    )
    n = sizes.events
    relay_rate = rate(relayed, relay.span.wall)
    e2e = rate(n, commit.span.wall + relay.span.wall)
    lower = min(raw_b["rate"], raw_d["insert_then_drain_rate"])
    return {
        "storage": db.kind,
        "broker": target.kind,
        "events": n,
        "per_key": sizes.per_key,
        "commit_batch": sizes.commit_batch,
        "relay_round": sizes.round_size,
        "commit_rate": rate(n, commit.span.wall),
        "relay_rate": relay_rate,
        "end_to_end_rate": e2e,
        "relay_cpu_cores": relay.span.cpu_cores,
        "relay_cpu_ms_per_1k": 1000 * relay.span.cpu / max(relayed, 1) * 1000,
        "relay_machine_busy_cores": relay.span.machine_busy,
        "relayed": relayed,
        "sent": counts.get("SENT", 0) - WARM_UP,
        "pending": counts.get("PENDING", 0),
        "dead": counts.get("DEAD", 0),
        "on_broker": None if on_broker is None else on_broker - WARM_UP,
        "keys_in_order": in_order,
        "consistent": consistent,
        "raw_broker": raw_b,
        "raw_db": raw_d,
        # Ours against the limits: the relay against the raw publish (the broker's side of the
        # relay), commit+relay against the raw insert-then-drain (the database's side).
        "relay_vs_raw_broker": relay_rate / raw_b["rate"],
        "e2e_vs_raw_db": e2e / raw_d["insert_then_drain_rate"],
        "lower_baseline": lower,
        "e2e_vs_lower_baseline": e2e / lower,
    }


def _keys_in_order(received: Sequence[Message], committed: Sequence[OutboxEvent]) -> bool:
    """Whether each key's messages arrived in the order its events were committed."""
    expected: dict[str, list[str]] = {}
    for e in committed:
        expected.setdefault(e.key, []).append(e.event_id)
    got: dict[str, list[str]] = {}
    for m in received:
        got.setdefault(m.key, []).append(m.headers["event_id"])
    return got == expected


class TimingBroker:
    """Wraps a broker and notes when each message (by ``event_id``) was acknowledged."""

    def __init__(self, inner: Broker) -> None:
        self.inner = inner
        self.acked: dict[str, float] = {}
        self.published = 0

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        results = await self.inner.publish(messages)
        now = time.perf_counter()
        for m, r in zip(messages, results, strict=True):
            if r is None:
                self.acked.setdefault(m.headers["event_id"], now)
                self.published += 1
        return results

    async def aclose(self) -> None:
        await self.inner.aclose()


#: How an event reaches the broker in a latency run: the writer publishes it right after its
#: commit; the relay polls (every 0.2 s, jittered); or the relay is woken by PostgreSQL NOTIFY
#: (``create_storage(..., notify=True)``), polling staying the guarantee.
LATENCY_PATHS = ("optimistic", "polling", "notify")


async def latency_case(
    storage_kind: str, target: BrokerTarget, sizes: OutboxSizes, *, path: str
) -> dict[str, Any]:
    """Commit events one at a time while the relay runs; commit-to-broker latencies."""
    if path not in LATENCY_PATHS:
        raise ValueError(f"unknown latency path {path!r}")
    with fresh_database(storage_kind) as db:
        storage = create_storage(db.url, notify=path == "notify")
        broker = TimingBroker(create_broker(target.url))
        try:
            return await _latency_case(db, storage, broker, target, sizes, path)
        finally:
            with anyio.CancelScope(shield=True):
                await broker.aclose()
                await storage.aclose()


async def _latency_case(
    db: Database,
    storage: SqlStorage,
    broker: TimingBroker,
    target: BrokerTarget,
    sizes: OutboxSizes,
    path: str,
) -> dict[str, Any]:
    optimistic = path == "optimistic"
    topic = target.new_topic("latency")
    await _prepare_topic(target, topic)
    publisher = OptimisticPublisher(storage, broker)
    # Three events per key, as a 3-step saga's step events; one event per transaction.
    events = make_events(topic, WARM_UP + sizes.latency_events, 3, "lat")
    committed: dict[str, float] = {}
    warm_published = 0

    def commit(event: OutboxEvent) -> Any:
        with storage.engine.begin() as conn:
            if optimistic:
                claim = publisher.append_outbox(event, conn=conn)
            else:
                storage.append_outbox(event, conn=conn)
                claim = None
        committed[event.event_id] = time.perf_counter()
        return claim

    async def settle(batch: Sequence[OutboxEvent]) -> None:
        # Polled on purpose: the relay acknowledges from its own task, in batches.
        with anyio.move_on_after(10):
            while any(e.event_id not in broker.acked for e in batch):  # noqa: ASYNC110
                await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(OutboxWorker(storage, broker).run)  # default 0.2 s polling
        for i, event in enumerate(events):
            if i == WARM_UP:
                await settle(events[:WARM_UP])
                warm_published = publisher.published
            claim = await anyio.to_thread.run_sync(commit, event)
            if claim is not None:
                await publisher.publish([claim], committed=True)
            await anyio.sleep(sizes.latency_gap)
        await settle(events[WARM_UP:])
        tg.cancel_scope.cancel()
    ids = [e.event_id for e in events[WARM_UP:]]
    lat = [(broker.acked[i] - committed[i]) * 1000 for i in ids if i in broker.acked]
    return {
        "storage": db.kind,
        "broker": target.kind,
        "path": path,
        "optimistic": optimistic,
        "events": len(ids),
        "acked": len(lat),
        "optimistic_share": (publisher.published - warm_published) / len(ids),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else math.nan,
        "consistent": len(lat) == len(ids),
    }
