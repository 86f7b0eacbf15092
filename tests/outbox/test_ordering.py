"""Per-key order under concurrency, refusals and a poison event, on PostgreSQL.

Four relay processes and three writer processes share one database. Writers commit events on a
dozen hot accounts (several per transaction, some rolled back) and publish them through
``OptimisticPublisher`` right after commit; relays send the rest. Every publisher's broker is a
:class:`~tests.outbox.app.FlakyBroker` over the real broker: it refuses some messages at random
(message-level refusals, which count attempts) and refuses the poison events every time. In the
test process, pairs of transactions on one key commit in an order other than the one they
started in. A consumer must see every key's events in commit order (repeats allowed, gaps not),
the poison keys only up to their dead event while every other key completes; ``saga outbox
dead`` shows the poison events; ``replay`` after the fix and ``skip`` let those keys flow on, in
order.

Commit order is observed by the application itself (``app_witness``: each transaction bumps
its account's version after appending, under the row lock, to commit) and, for the pairs, by
the test's threads.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from sqlalchemy import create_engine, func, select, text

from saga_brokers import InMemoryBroker
from saga_core import ConsumerRunner, Message, OptimisticPublisher, OutboxWorker
from saga_storage import SqlStorage, create_storage
from tests.outbox.app import (
    append_with_witness,
    commit_events,
    create_app_tables,
    expected_order,
    make_event,
    order_problems,
    with_app_name,
)
from tests.outbox.conftest import Collector, Db, Procs, Target, sessions

pytestmark = pytest.mark.anyio

RELAYS = 4
WRITERS = 3
HOT = ",".join(f"hot-{i:02d}" for i in range(12))
#: Random refusals per publisher and event (at most one each), and the attempts before DEAD:
#: an ordinary event would need 8 refusals in a row to go DEAD.
REFUSE_RATE = "0.08"
MAX_ATTEMPTS = "8"
ROUNDS = 4


def _saga_cli(db: Db, *args: str) -> str:
    """Run ``saga outbox ...`` (the console script) against ``db``; its output."""
    script = Path(sys.executable).with_name("saga")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "saga_cli.main"]
    done = subprocess.run(
        [*cmd, "outbox", *args, "--database", db.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"saga outbox {args}: {done.stdout}{done.stderr}"
    return done.stdout


def _statuses(storage: SqlStorage, key: str) -> list[tuple[int, str]]:
    outbox = storage.tables.outbox
    with storage.engine.connect() as conn:
        return [
            (r.seq, r.status)
            for r in conn.execute(
                select(outbox.c.seq, outbox.c.status)
                .where(outbox.c.key == key)
                .order_by(outbox.c.seq)
            )
        ]


class Race:
    """Pairs of transactions on key ``race`` that commit in another order than they began.

    - ``commit_first``: A begins (its transaction id, and an event on another key, come
      first), B begins, appends to ``race`` and commits; only then A appends to ``race`` and
      commits. Commit order: B, A.
    - ``lock_wait``: A appends to ``race``; B begins and its append waits on the key's row lock
      (seen in ``pg_stat_activity``) until A commits. Commit order: A, B.

    Both publish optimistically right after their commit, from their own threads.
    """

    def __init__(self, db: Db, storage: SqlStorage, publisher: OptimisticPublisher, topic: str):
        assert db.schema is not None
        self.db = db
        self.storage = storage
        self.publisher = publisher
        self.topic = topic
        self.b_name = f"{db.schema}-race-b"
        self.b_engine = create_engine(with_app_name(db.url, self.b_name))
        #: (first committed event id, second committed event id) per round
        self.commit_order: list[tuple[str, str]] = []
        #: transaction ids (txid_current) of (A, B) per commit_first round
        self.txids: list[tuple[int, int]] = []
        #: (A's first event, B's event, A's event on ``race``) per commit_first round
        self.writes: list[tuple[str, str, str]] = []

    def close(self) -> None:
        self.b_engine.dispose()

    def _publish(self, claim: Any) -> None:
        anyio.from_thread.run(self.publisher.publish, [claim])

    async def commit_first(self, n: int) -> None:
        a = make_event(self.topic, "race", writer="race-a", n=n)
        side = make_event(self.topic, "race-side", writer="race-a", n=n)
        b = make_event(self.topic, "race", writer="race-b", n=n)
        a_began, b_committed = threading.Event(), threading.Event()
        txid: dict[str, int] = {}

        def tx_a() -> None:
            with self.storage.engine.begin() as conn:
                txid["a"] = conn.execute(text("SELECT txid_current()")).scalar_one()
                side_claim = append_with_witness(
                    self.storage, conn, side, writer="race-a", publisher=self.publisher
                )
                a_began.set()
                assert b_committed.wait(20), "B never committed"
                claim = append_with_witness(
                    self.storage, conn, a, writer="race-a", publisher=self.publisher
                )
            self._publish(side_claim)
            self._publish(claim)

        def tx_b() -> None:
            assert a_began.wait(20), "A never began"
            with self.b_engine.begin() as conn:
                txid["b"] = conn.execute(text("SELECT txid_current()")).scalar_one()
                claim = append_with_witness(
                    self.storage, conn, b, writer="race-b", publisher=self.publisher
                )
            b_committed.set()
            self._publish(claim)

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, tx_a)
            tg.start_soon(anyio.to_thread.run_sync, tx_b)
        assert txid["a"] < txid["b"]  # A began first...
        self.txids.append((txid["a"], txid["b"]))
        self.writes.append((side.event_id, b.event_id, a.event_id))
        self.commit_order.append((b.event_id, a.event_id))  # ...B committed first

    async def lock_wait(self, n: int) -> None:
        a = make_event(self.topic, "race", writer="race-a", n=n)
        b = make_event(self.topic, "race", writer="race-b", n=n)
        a_appended, b_waits = threading.Event(), threading.Event()

        def tx_a() -> None:
            with self.storage.engine.begin() as conn:
                claim = append_with_witness(
                    self.storage, conn, a, writer="race-a", publisher=self.publisher
                )
                a_appended.set()
                assert b_waits.wait(20), "B never waited for the key's lock"
            self._publish(claim)

        def tx_b() -> None:
            assert a_appended.wait(20), "A never appended"
            with self.b_engine.begin() as conn:
                claim = append_with_witness(
                    self.storage, conn, b, writer="race-b", publisher=self.publisher
                )
            self._publish(claim)

        def b_is_waiting() -> bool:
            return any(
                s["application_name"] == self.b_name and s["wait_event_type"] == "Lock"
                for s in sessions(self.db)
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, tx_a)
            tg.start_soon(anyio.to_thread.run_sync, tx_b)
            with anyio.fail_after(20):
                while not b_is_waiting():
                    await anyio.sleep(0.01)
            b_waits.set()
        self.commit_order.append((a.event_id, b.event_id))


async def _wait(predicate: Callable[[], Any], within: float, what: str, procs: Procs) -> None:
    deadline = anyio.current_time() + within
    while not await predicate():
        if anyio.current_time() > deadline:
            raise AssertionError(
                f"{what} did not happen within {within:.0f}s; unexpected exits: "
                f"{procs.unexpected()}\n"
                + "\n".join(procs.tail(f"relay-{i}", 5) for i in range(RELAYS))
            )
        await anyio.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("shared_target", ["redis", "kafka", "rabbitmq"], indirect=True)
async def test_keys_keep_commit_order_across_relays_refusals_and_a_poison_event(
    shared_target: Target, pg_db: Db, procs: Procs, tmp_path: Path
) -> None:
    seed = int(os.environ.get("SAGA_OUTBOX_SEED") or random.randrange(1 << 30))
    print(f"SAGA_OUTBOX_SEED={seed}")
    rng = random.Random(seed)
    fixed = tmp_path / "fixed"  # a file NAME here: poison NAME is no longer refused
    fixed.mkdir()
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    broker = shared_target.open()
    topic = shared_target.names.topic("acct")
    group = shared_target.names.group("order")
    collector = Collector()
    runner = ConsumerRunner(broker, [topic], group, collector.handle, poll_timeout=0.2)
    flaky = ["--refuse-rate", REFUSE_RATE, "--poison-dir", str(fixed)]
    tries = ["--max-attempts", MAX_ATTEMPTS, "--retry-backoff", "0.1"]
    publisher = OptimisticPublisher(storage, broker, retry_backoff=0.1, max_attempts=8)
    race = Race(pg_db, storage, publisher, topic)
    poison: dict[str, str] = {}  # key -> its poison event id

    async def poison_key(key: str) -> None:
        for n in range(1, 6):
            event = make_event(topic, key, writer="test", n=n, poison=key if n == 3 else None)
            await anyio.to_thread.run_sync(
                lambda e=event: commit_events(storage, [e], writer="test")
            )
            if n == 3:
                poison[key] = event.event_id

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)  # the group exists before anything is published
            for i in range(RELAYS):
                procs.start(
                    f"relay-{i}", "relay",
                    "--db", pg_db.url, "--broker", shared_target.url,
                    "--batch-keys", "4", "--batch-events", "10", "--claim-seconds", "10",
                    "--poll", "0.05", "--seed", str(rng.randrange(1 << 30)), *flaky, *tries,
                )  # fmt: skip
            for i in range(WRITERS):
                procs.start(
                    f"writer-{i}", "writer",
                    "--db", pg_db.url, "--broker", shared_target.url, "--topic", topic,
                    "--accts", HOT, "--name", f"w{i}", "--transactions", "130",
                    "--max-events", "4", "--rollback-rate", "0.1", "--pause", "0.01",
                    "--seed", str(rng.randrange(1 << 30)), *flaky, *tries,
                )  # fmt: skip
            await poison_key("poison-replay")
            for n in range(ROUNDS):
                await race.commit_first(2 * n)
                await race.lock_wait(2 * n + 1)
            await poison_key("poison-skip")
            for i in range(WRITERS):
                assert await anyio.to_thread.run_sync(procs.procs[f"writer-{i}"].wait) == 0, (
                    procs.tail(f"writer-{i}")
                )

            # Every key but the poison ones completes while those stay blocked.
            expected = expected_order(storage.engine)
            flowing = [e for k, ids in expected.items() if k not in poison for e in ids]
            flowing += [e for k in poison for e in expected[k][:2]]
            await collector.wait_for(flowing, 90, "the keys without a poison event")

            async def only_poison_left() -> bool:
                stats = await storage.outbox_stats()
                dead = {d.event_id for d in await storage.dead_events()}
                return dead == set(poison.values()) and (
                    stats.dead,
                    stats.blocked_keys,
                    stats.pending,
                ) == (2, 2, 4)

            await _wait(only_poison_left, 60, "both poison events going DEAD, alone", procs)
            for key in poison:  # 1, 2 sent; 3 dead; 4, 5 wait behind it
                assert _statuses(storage, key) == [
                    (1, "SENT"),
                    (2, "SENT"),
                    (3, "DEAD"),
                    (4, "PENDING"),
                    (5, "PENDING"),
                ]
            blocked_view = order_problems(
                collector.pairs(), expected_order(storage.engine), blocked=poison
            )
            assert blocked_view == []

            # The operator sees them...
            listing = _saga_cli(pg_db, "dead")
            for key, event_id in poison.items():
                line = next(ln for ln in listing.splitlines() if event_id in ln)
                assert key in line and "poison" in line and MAX_ATTEMPTS in line.split()
            # ...fixes the cause of one and replays its key, skips the other's event.
            (fixed / "poison-replay").touch()
            assert "resumes at event" in _saga_cli(pg_db, "replay", "poison-replay")
            assert "skipped" in _saga_cli(
                pg_db, "skip", poison["poison-skip"], "--note", "bad payload, ticket OPS-7"
            )
            expected = expected_order(storage.engine)
            everything = [e for ids in expected.values() for e in ids]
            wanted = set(everything) - {poison["poison-skip"]}
            await collector.wait_for(wanted, 60, "the poison keys after replay and skip")

            async def all_sent() -> bool:
                return (await storage.outbox_stats()).pending == 0

            await _wait(all_sent, 30, "every event recorded as sent", procs)
            tg.cancel_scope.cancel()
        stats = await storage.outbox_stats()
        dead = await storage.dead_events()
        outbox = storage.tables.outbox
        with storage.engine.connect() as conn:
            row_id = dict(conn.execute(select(outbox.c.event_id, outbox.c.id)).all())
            retried = conn.execute(
                select(func.count()).where(
                    outbox.c.attempts > 0, outbox.c.event_id.not_in(list(poison.values()))
                )
            ).scalar_one()
    finally:
        race.close()
        with anyio.CancelScope(shield=True):
            await broker.aclose()
        storage.dispose()

    exits = procs.stop_all([slot for slot in procs.procs if slot.startswith("relay")])
    optimistic = sum(
        int(m)
        for m in re.findall(
            r"\((\d+) published optimistically\)", "\n".join(procs.grep("published optimistically"))
        )
    )
    duplicates = len(collector.messages) - len(collector.ids())
    print(
        f"{shared_target.kind}: {len(everything)} events on {len(expected)} keys, "
        f"{optimistic} published optimistically by writers, {retried} refused at least once, "
        f"{len(collector.messages)} deliveries ({duplicates} repeats)"
    )
    assert procs.unexpected() == []
    assert exits == {f"relay-{i}": 0 for i in range(RELAYS)}
    assert dead == [] and (stats.dead, stats.blocked_keys, stats.pending) == (0, 0, 0)
    assert retried > 0, "no message-level refusal was injected"
    assert optimistic > 0, "the optimistic path published nothing"
    # Every key in commit order, the skipped event never delivered, the replayed one in place.
    assert order_problems(collector.pairs(), expected, skipped={poison["poison-skip"]}) == []
    first: dict[str, int] = {}
    for i, (_, event_id) in enumerate(collector.pairs()):
        first.setdefault(event_id, i)
    for earlier, later in race.commit_order:
        assert first[earlier] < first[later]
    assert len(race.txids) == ROUNDS
    for side, b, a in race.writes:
        # A wrote first (its first outbox row precedes B's) yet committed last: ``race`` goes
        # out in commit order, B before A, whatever the row ids say.
        assert row_id[side] < row_id[b] < row_id[a]
        assert first[b] < first[a]
    values = {m.event_id: json.loads(m.value) for m in collector.messages}
    assert [values[e]["n"] for e in expected["poison-replay"]] == [1, 2, 3, 4, 5]
    assert values[poison["poison-replay"]]["poison"] == "poison-replay"


async def test_a_relay_round_never_deadlocks_a_writer_of_several_keys(pg_db: Db) -> None:
    """A relay records a round of several keys while a writer's transaction appends to two of
    them, taking the key the relay records last first: the writer must not fail (nor the relay).

    The writer takes its first key while the relay publishes, and its second once the relay's
    recording waits for the first one (seen in ``pg_stat_activity``): a relay that holds a key
    row it recorded while it waits for the next makes a lock cycle with the writer, and
    PostgreSQL aborts one of them.
    """
    assert pg_db.schema is not None
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    relay_name = f"{pg_db.schema}-relay"
    relay_storage = create_storage(with_app_name(pg_db.url, relay_name), migrate=False)
    for key in ("key-1", "key-2", "key-3"):
        commit_events(storage, [make_event("acct", key, writer="setup", n=0)], writer="setup")
    publishing, release = threading.Event(), threading.Event()
    published: list[str] = []

    class HeldBroker(InMemoryBroker):
        """Acknowledges a batch only once the writer holds its key."""

        async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
            published.extend(m.key for m in messages)
            publishing.set()
            await anyio.to_thread.run_sync(release.wait, 20.0)
            return await super().publish(messages)

    def relay_waits() -> bool:
        return any(
            s["application_name"] == relay_name and s["wait_event_type"] == "Lock"
            for s in sessions(pg_db)
        )

    def writer() -> None:
        assert publishing.wait(20), "the relay never published"
        first, last = published[0], published[-1]
        with storage.engine.begin() as conn:
            append_with_witness(
                storage, conn, make_event("acct", last, writer="w", n=1), writer="w"
            )
            release.set()
            deadline = time.monotonic() + 20
            while not relay_waits():  # the relay is recording its round, blocked on `last`
                assert time.monotonic() < deadline, "the relay never waited for the writer"
                time.sleep(0.01)
            append_with_witness(
                storage, conn, make_event("acct", first, writer="w", n=1), writer="w"
            )

    errors: list[BaseException] = []

    async def run(fn: Callable[[], Any]) -> None:
        try:
            await fn()
        except Exception as exc:
            errors.append(exc)

    relay = OutboxWorker(relay_storage, HeldBroker(), batch_keys=10)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, partial(anyio.to_thread.run_sync, writer))
            tg.start_soon(run, relay.relay_once)
        assert errors == [], f"a relay round and a writer failed each other: {errors!r}"
        assert await relay.drain() == 2
        assert (await storage.outbox_stats()).pending == 0
    finally:
        release.set()
        relay_storage.dispose()
        storage.dispose()
