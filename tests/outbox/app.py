"""The application the outbox end-to-end tests run, in the test process and as real processes.

Entry points (``python -m tests.outbox.app <command> ...``), each stopped by SIGTERM (or killed):

- ``relay``: an ``OutboxWorker`` relaying the outbox of ``--db`` to ``--broker``. With
  ``--refuse-rate`` / ``--poison-dir`` its broker is wrapped in :class:`FlakyBroker`, which
  refuses single messages as a real broker refuses one (too large, unroutable).
- ``writer``: application transactions that change accounts and append their events with
  ``storage.append_outbox`` (``--optimistic``: ``OptimisticPublisher.append_outbox``, and the
  claims are published right after commit).
- ``consumer``: a ``ConsumerRunner`` whose handler goes through an ``Inbox``: it writes a ledger
  row and a balance in the inbox's own transaction. It can hold that transaction open
  (``--hold``) and SIGKILL itself after a commit, before the acknowledgement
  (``--die-after-commit``).

The application's tables (SQLAlchemy Core, on PostgreSQL and SQLite):

- ``app_accounts(acct, version)``: the aggregates. A transaction appends an account's event and
  *then* bumps its version; the row lock is held to commit, so an account's versions are its
  commit order, observed by the application independently of the outbox's own sequence.
- ``app_witness(event_id, acct, version, writer)``: for every committed event, that version (a
  rolled-back transaction leaves no witness). It is what consumers are checked against.
- ``app_ledger`` / ``app_balances``: a consumer's effects (rows are never deduplicated by a
  constraint: a double application would show as two rows).
- ``app_deliveries``: every delivery a consumer process handled and whether its inbox applied
  it, written after the inbox transaction (for the test's eyes only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    select,
    text,
)
from sqlalchemy.engine import make_url

from saga_brokers import create_broker
from saga_brokers._common import fail_rest_of_key
from saga_core import (
    ConsumerRunner,
    Inbox,
    Message,
    OptimisticPublisher,
    OutboxEvent,
    OutboxWorker,
    PublishFailed,
)
from saga_core.ports import Broker
from saga_core.records import ClaimedKey
from saga_core.retry import RetryPolicy
from saga_storage import SqlStorage, create_storage

log = logging.getLogger("tests.outbox.app")

#: Every test event has this type; the account is the key.
EVENT_TYPE = "acct_changed"

# --- the application's tables ----------------------------------------------------------------

metadata = MetaData()
accounts = Table(
    "app_accounts",
    metadata,
    Column("acct", String(100), primary_key=True),
    Column("version", BigInteger, nullable=False),
)
witness = Table(
    "app_witness",
    metadata,
    Column("event_id", String(36), primary_key=True),
    Column("acct", String(100), nullable=False, index=True),
    Column("version", BigInteger, nullable=False),
    Column("writer", String(100), nullable=False),
)
ledger = Table(
    "app_ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False),
    Column("acct", String(100), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("consumer", String(100), nullable=False),
    Column("pid", Integer, nullable=False),
)
balances = Table(
    "app_balances",
    metadata,
    Column("acct", String(100), primary_key=True),
    Column("total", BigInteger, nullable=False),
)
deliveries = Table(
    "app_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False),
    Column("consumer", String(100), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("applied", Boolean, nullable=False),
    Column("at", Float, nullable=False),
)


def create_app_tables(engine: Engine) -> None:
    """The application's tables, next to the library's."""
    metadata.create_all(engine)


def with_app_name(url: str, name: str) -> str:
    """``url`` whose PostgreSQL sessions show ``application_name=name`` (SQLite: unchanged)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return url
    return parsed.update_query_dict({"application_name": name[:63]}).render_as_string(False)


# --- events and the transactions that write them ---------------------------------------------


def make_event(
    topic: str, acct: str, *, writer: str, n: int, poison: str | None = None
) -> OutboxEvent:
    """An account's event; ``poison`` makes every :class:`FlakyBroker` refuse it (until fixed)."""
    payload: dict[str, Any] = {"acct": acct, "n": n, "amount": n % 7 + 1, "writer": writer}
    if poison is not None:
        payload["poison"] = poison
    return OutboxEvent(
        aggregate_type="acct",
        aggregate_id=acct,
        event_type=EVENT_TYPE,
        topic=topic,
        payload=payload,
        headers={"x-writer": writer},
    )


class RolledBack(Exception):
    """Raised inside an application transaction to roll it back after it appended events."""


def bump_version(conn: Connection, acct: str) -> int:
    """The account's next version; its row stays locked until the transaction ends."""
    conn.execute(
        text(
            "INSERT INTO app_accounts (acct, version) VALUES (:a, 0) ON CONFLICT (acct) DO NOTHING"
        ),
        {"a": acct},
    )
    return int(
        conn.execute(
            text("UPDATE app_accounts SET version = version + 1 WHERE acct = :a RETURNING version"),
            {"a": acct},
        ).scalar_one()
    )


def append_with_witness(
    storage: SqlStorage,
    conn: Connection,
    event: OutboxEvent,
    *,
    writer: str,
    publisher: OptimisticPublisher | None = None,
) -> ClaimedKey | None:
    """Append ``event`` in the caller's transaction, then record its account's new version."""
    if publisher is None:
        claim = storage.append_outbox(event, conn=conn)
    else:
        claim = publisher.append_outbox(event, conn=conn)
    version = bump_version(conn, event.key)
    conn.execute(
        witness.insert().values(
            event_id=event.event_id, acct=event.key, version=version, writer=writer
        )
    )
    return claim


def commit_events(
    storage: SqlStorage,
    events: Sequence[OutboxEvent],
    *,
    writer: str,
    publisher: OptimisticPublisher | None = None,
    rollback: bool = False,
) -> list[ClaimedKey | None]:
    """One application transaction appending ``events`` (pass them sorted by key: writers take
    key locks in one order). ``rollback=True`` raises :class:`RolledBack` after appending."""
    with storage.engine.begin() as conn:
        claims = [
            append_with_witness(storage, conn, e, writer=writer, publisher=publisher)
            for e in events
        ]
        if rollback:
            raise RolledBack(f"{writer} rolls back {len(events)} events")
    return claims


def outbox_rows(storage: SqlStorage) -> list[Any]:
    """Every outbox row (event id, key, seq, status, topic, attempts), by key and sequence."""
    out = storage.tables.outbox
    with storage.engine.connect() as conn:
        return list(
            conn.execute(
                select(
                    out.c.event_id, out.c.key, out.c.seq, out.c.status, out.c.topic, out.c.attempts
                ).order_by(out.c.key, out.c.seq)
            ).all()
        )


def expected_order(engine: Engine) -> dict[str, list[str]]:
    """Per account, the committed event ids in commit order (the application's versions)."""
    out: dict[str, list[str]] = defaultdict(list)
    with engine.connect() as conn:
        rows = conn.execute(
            select(witness.c.acct, witness.c.event_id).order_by(witness.c.acct, witness.c.version)
        ).all()
    for acct, event_id in rows:
        out[acct].append(event_id)
    return dict(out)


def order_problems(
    received: Iterable[tuple[str, str]],
    expected: Mapping[str, Sequence[str]],
    *,
    blocked: Mapping[str, str] | None = None,
    skipped: Collection[str] = (),
) -> list[str]:
    """What is wrong with ``received`` ((key, event_id) in delivery order) against ``expected``.

    Duplicates are allowed, gaps and reordering are not: after dropping every delivery of an
    event already seen, each key's events must be exactly its commit order (without the
    ``skipped`` events), or, for a key ``blocked`` at an event, exactly the events before it.
    An event that was never committed must never be delivered.
    """
    blocked = blocked or {}
    position = {e: i + 1 for ids in expected.values() for i, e in enumerate(ids)}
    owner = {e: k for k, ids in expected.items() for e in ids}
    firsts: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    problems: list[str] = []
    for key, event_id in received:
        if event_id not in position:
            problems.append(f"key {key}: event {event_id} was delivered but never committed")
            continue
        if owner[event_id] != key:
            problems.append(f"event {event_id} came with key {key}, not {owner[event_id]}")
        if event_id not in seen:
            seen.add(event_id)
            firsts[key].append(event_id)
    for key, ids in sorted(expected.items()):
        want = [e for e in ids if e not in skipped]
        if key in blocked:
            want = want[: want.index(blocked[key])]
        got = firsts.get(key, [])
        if got != want:
            at = next(
                (i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w),
                min(len(got), len(want)),
            )
            problems.append(
                f"key {key}: first deliveries (commit positions) "
                f"{[position[e] for e in got]} != expected {[position[e] for e in want]} "
                f"(first difference at index {at})"
            )
    return problems


# --- a broker that refuses single messages ----------------------------------------------------


class FlakyBroker:
    """Wraps a real broker and refuses some messages as a broker refuses one message.

    - A message whose payload has ``"poison": NAME`` is refused every time, until a file
      ``NAME`` exists in ``poison_dir`` (the cause was fixed).
    - Any other message is refused with probability ``refuse_rate`` the first time this
      process sees its event (so an event is refused at most once per process).

    As the ``Broker`` contract requires, later messages of a refused message's key in the same
    batch are not sent and are reported refused too. Everything else goes to the real broker;
    its outages (``BrokerUnavailable``) pass through.
    """

    def __init__(
        self,
        inner: Broker,
        *,
        refuse_rate: float = 0.0,
        poison_dir: Path | None = None,
        seed: int | None = None,
    ) -> None:
        self.inner = inner
        self.refuse_rate = refuse_rate
        self.poison_dir = poison_dir
        self._rng = random.Random(seed)
        self._seen: set[str] = set()
        #: How many messages were refused (for the log).
        self.refused = 0

    def _refusal(self, message: Message) -> str | None:
        try:
            poison = json.loads(message.value).get("poison")
        except ValueError:
            poison = None
        if poison is not None and not (self.poison_dir and (self.poison_dir / poison).exists()):
            return f"poison event {message.event_id} ({poison}) refused"
        if message.event_id in self._seen:
            return None
        self._seen.add(message.event_id)
        if self._rng.random() < self.refuse_rate:
            return f"injected refusal of event {message.event_id}"
        return None

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        results: list[BaseException | None] = [None] * len(messages)
        refused_keys: set[str] = set()
        forward: list[int] = []
        for i, m in enumerate(messages):
            if m.key in refused_keys:
                continue  # reported by fail_rest_of_key below, never sent
            reason = self._refusal(m)
            if reason is not None:
                self.refused += 1
                results[i] = PublishFailed(reason)
                refused_keys.add(m.key)
            else:
                forward.append(i)
        if forward:
            sent = await self.inner.publish([messages[i] for i in forward])
            for i, r in zip(forward, sent, strict=True):
                results[i] = r
        return fail_rest_of_key(messages, results)

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- entry points -------------------------------------------------------------------------------


async def _wait_for_sigterm() -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def relay_main(args: argparse.Namespace) -> None:
    storage = create_storage(args.db)
    broker: Broker = create_broker(args.broker)
    flaky = None
    if args.refuse_rate or args.poison_dir:
        flaky = broker = FlakyBroker(
            broker,
            refuse_rate=args.refuse_rate,
            poison_dir=Path(args.poison_dir) if args.poison_dir else None,
            seed=args.seed,
        )
    worker = OutboxWorker(
        storage,
        broker,
        batch_keys=args.batch_keys,
        batch_events=args.batch_events,
        claim_seconds=args.claim_seconds,
        poll_interval=args.poll,
        max_attempts=args.max_attempts,
        retry_backoff=args.retry_backoff,
    )

    async def progress() -> None:
        last = -1
        while True:
            await anyio.sleep(1.0)
            if worker.published != last:
                last = worker.published
                refused = f", refused {flaky.refused}" if flaky else ""
                log.info("published %d%s", last, refused)

    log.info("relay %s ready (pid %d)", worker.owner, os.getpid())
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            tg.start_soon(progress)
            await _wait_for_sigterm()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()
        storage.dispose()
    log.info("relay stopped after publishing %d events", worker.published)


async def writer_main(args: argparse.Namespace) -> None:
    storage = create_storage(args.db)
    rng = random.Random(args.seed)
    accts = args.accts.split(",")
    broker: Broker | None = None
    publisher = None
    if args.broker:
        broker = create_broker(args.broker)
        if args.refuse_rate or args.poison_dir:
            broker = FlakyBroker(
                broker,
                refuse_rate=args.refuse_rate,
                poison_dir=Path(args.poison_dir) if args.poison_dir else None,
                seed=args.seed,
            )
        publisher = OptimisticPublisher(
            storage, broker, max_attempts=args.max_attempts, retry_backoff=args.retry_backoff
        )
    committed = rolled_back = 0
    log.info("writer %s ready (pid %d)", args.name, os.getpid())
    try:
        deadline = time.monotonic() + args.duration
        for i in itertools.count():
            if (args.transactions and i >= args.transactions) or (
                args.duration and time.monotonic() > deadline
            ):
                break
            chosen = sorted(rng.choices(accts, k=rng.randint(1, args.max_events)))
            events = [make_event(args.topic, a, writer=args.name, n=i) for a in chosen]
            rollback = rng.random() < args.rollback_rate
            try:
                claims = await anyio.to_thread.run_sync(
                    partial(
                        commit_events,
                        storage,
                        events,
                        writer=args.name,
                        publisher=publisher,
                        rollback=rollback,
                    )
                )
            except RolledBack:
                rolled_back += len(events)
                continue
            committed += len(events)
            if publisher is not None:
                await publisher.publish(claims)
            if args.pause:
                await anyio.sleep(rng.uniform(0, 2 * args.pause))
    finally:
        if broker is not None:
            with anyio.CancelScope(shield=True):
                await broker.aclose()
        storage.dispose()
    optimistic = publisher.published if publisher is not None else 0
    log.info(
        "writer %s done: %d events committed (%d published optimistically), %d rolled back",
        args.name,
        committed,
        optimistic,
        rolled_back,
    )


def _apply(name: str, hold: float, conn: Connection, message: Message) -> None:
    """The consumer's effect, in the inbox's transaction: a ledger row and a balance."""
    amount = int(json.loads(message.value)["amount"])
    conn.execute(
        ledger.insert().values(
            event_id=message.event_id,
            acct=message.key,
            amount=amount,
            consumer=name,
            pid=os.getpid(),
        )
    )
    conn.execute(
        text(
            "INSERT INTO app_balances (acct, total) VALUES (:a, :n) "
            "ON CONFLICT (acct) DO UPDATE SET total = app_balances.total + excluded.total"
        ),
        {"a": message.key, "n": amount},
    )
    if hold:
        time.sleep(hold)  # the transaction (and the inbox row) stays open meanwhile


def _record_delivery(engine: Engine, name: str, event_id: str, applied: bool) -> None:
    with engine.begin() as conn:
        conn.execute(
            deliveries.insert().values(
                event_id=event_id, consumer=name, pid=os.getpid(), applied=applied, at=time.time()
            )
        )


async def consumer_main(args: argparse.Namespace) -> None:
    storage = create_storage(with_app_name(args.db, args.app_name or args.name))
    broker = create_broker(args.broker)
    inbox = Inbox(storage, args.group)
    applied_count = 0

    async def handle(message: Message) -> None:
        nonlocal applied_count
        applied = await inbox.handle(message, partial(_apply, args.name, args.hold))
        if applied:
            applied_count += 1
            if applied_count == args.die_after_commit:
                # Committed, not acknowledged: the broker must deliver it again.
                log.warning("dying after committing event %s", message.event_id)
                os.kill(os.getpid(), signal.SIGKILL)
        await anyio.to_thread.run_sync(
            _record_delivery, storage.engine, args.name, message.event_id, applied
        )

    runner = ConsumerRunner(
        broker,  # type: ignore[arg-type]
        [args.topic],
        args.group,
        handle,
        name=args.name,
        batch_size=args.batch,
        poll_timeout=0.5,
        retry=RetryPolicy(max_attempts=50, backoff=0.1, max_backoff=1.0),
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            log.info("consumer %s ready (pid %d)", args.name, os.getpid())
            await _wait_for_sigterm()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()
        storage.dispose()
    log.info("consumer %s stopped after handling %d messages", args.name, runner.handled)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.outbox.app")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("relay", help="an OutboxWorker until SIGTERM")
    r.add_argument("--db", required=True)
    r.add_argument("--broker", required=True)
    r.add_argument("--batch-keys", type=int, default=100)
    r.add_argument("--batch-events", type=int, default=100)
    r.add_argument("--claim-seconds", type=float, default=30.0)
    r.add_argument("--poll", type=float, default=0.2)
    r.add_argument("--max-attempts", type=int, default=10)
    r.add_argument("--retry-backoff", type=float, default=1.0)
    r.add_argument("--refuse-rate", type=float, default=0.0)
    r.add_argument("--poison-dir")
    r.add_argument("--seed", type=int)
    r.set_defaults(main=relay_main)

    w = sub.add_parser("writer", help="application transactions appending events")
    w.add_argument("--db", required=True)
    w.add_argument("--topic", required=True)
    w.add_argument("--accts", required=True, help="comma-separated account names (the keys)")
    w.add_argument("--transactions", type=int, default=0, help="how many (0: no limit)")
    w.add_argument("--duration", type=float, default=0.0, help="seconds to run (0: no limit)")
    w.add_argument("--max-events", type=int, default=1, help="events per transaction, at most")
    w.add_argument("--rollback-rate", type=float, default=0.0)
    w.add_argument("--pause", type=float, default=0.0, help="mean pause between transactions")
    w.add_argument("--name", default="writer")
    w.add_argument("--seed", type=int)
    w.add_argument("--broker", help="publish optimistically to this broker after each commit")
    w.add_argument("--max-attempts", type=int, default=10)
    w.add_argument("--retry-backoff", type=float, default=1.0)
    w.add_argument("--refuse-rate", type=float, default=0.0)
    w.add_argument("--poison-dir")
    w.set_defaults(main=writer_main)

    c = sub.add_parser("consumer", help="a ConsumerRunner through an Inbox until SIGTERM")
    c.add_argument("--db", required=True)
    c.add_argument("--broker", required=True)
    c.add_argument("--topic", required=True)
    c.add_argument("--group", required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--app-name", help="PostgreSQL application_name (default: --name)")
    c.add_argument("--batch", type=int, default=100)
    c.add_argument(
        "--hold", type=float, default=0.0, help="seconds the inbox transaction stays open"
    )
    c.add_argument("--die-after-commit", type=int, default=0, help="SIGKILL after the Nth commit")
    c.set_defaults(main=consumer_main)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{args.command} %(process)d] %(name)s: %(message)s",
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    anyio.run(args.main, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
