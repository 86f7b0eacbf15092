"""The relay SIGKILLed mid-batch, the broker down: every committed event still arrives.

A writer process commits a few thousand events (application transactions, some rolled back)
while a relay process (``python -m tests.outbox.app relay``) publishes them in small batches.
The test SIGKILLs the relay at random moments and starts it again, and takes the broker down
for a while (a private tansu or the shared RabbitMQ behind a proxy that is closed, or a private
durable redis-server that is SIGKILLed), killing a relay during the outage too. A consumer in
the test process, through the same broker, must see every committed event at least once, each
key in commit order after removing repeats; no event may lose an attempt to the outage.

The second test stops the broker for 30 s while events keep being committed, under a relay
that gives up on an event after 3 refusals: an outage is not a refusal, so nothing goes DEAD.

``SAGA_OUTBOX_SEED=<n>`` replays the same random kills and writes.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select

from saga_core import ConsumerRunner
from saga_core.records import OutboxStats
from saga_storage import SqlStorage, create_storage
from tests.outbox.app import create_app_tables, expected_order, order_problems
from tests.outbox.conftest import Collector, Db, Procs, Target, outage_params

pytestmark = pytest.mark.anyio

ACCTS = ",".join(f"acct-{i:02d}" for i in range(40))
#: SIGKILLs of the relay at least (the first ones while the writer is still writing).
MIN_KILLS = 7


def _seed() -> int:
    seed = int(os.environ.get("SAGA_OUTBOX_SEED") or random.randrange(1 << 30))
    print(f"SAGA_OUTBOX_SEED={seed}")
    return seed


def _relay_args(db: Db, target: Target, **options: str) -> list[str]:
    opts = {
        "--batch-keys": "4",
        "--batch-events": "5",
        "--claim-seconds": "1.5",
        "--poll": "0.05",
        "--max-attempts": "3",
        "--retry-backoff": "0.2",
        **options,
    }
    return ["--db", db.url, "--broker", target.url, *[x for kv in opts.items() for x in kv]]


def _claim_tokens(storage: SqlStorage) -> set[str]:
    okey = storage.tables.outbox_key
    with storage.engine.connect() as conn:
        return set(
            conn.execute(select(okey.c.claim_token).where(okey.c.claim_token.is_not(None)))
            .scalars()
            .all()
        )


def _outbox_summary(storage: SqlStorage) -> dict[str, Any]:
    outbox = storage.tables.outbox
    with storage.engine.connect() as conn:
        statuses = dict(
            conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)).all()
        )
        attempts = conn.execute(select(func.max(outbox.c.attempts))).scalar()
    return {"statuses": statuses, "max_attempts": attempts}


async def _wait_for_stats(
    storage: SqlStorage, done: Callable[[OutboxStats], bool], within: float, what: str, procs: Procs
) -> OutboxStats:
    deadline = anyio.current_time() + within
    while True:
        stats = await storage.outbox_stats()
        if done(stats):
            return stats
        if anyio.current_time() > deadline:
            raise AssertionError(
                f"{what} did not happen within {within:.0f}s: {stats}\n"
                f"unexpected exits: {procs.unexpected()}\nrelay log:\n{procs.tail('relay')}"
            )
        await anyio.sleep(0.1)


async def _start_relay(procs: Procs, args: list[str]) -> None:
    procs.start("relay", "relay", *args)
    await anyio.to_thread.run_sync(procs.wait_ready, "relay")


@pytest.mark.slow
@pytest.mark.parametrize(
    "outage_target", outage_params("kafka", "rabbitmq", "redis"), indirect=True
)
async def test_relay_killed_mid_batch_and_broker_down_every_event_arrives(
    outage_target: Target, pg_db: Db, procs: Procs
) -> None:
    rng = random.Random(_seed())
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    broker = outage_target.open()
    topic = outage_target.names.topic("acct")
    group = outage_target.names.group("crash")
    collector = Collector()
    runner = ConsumerRunner(
        broker, [topic], group, collector.handle, poll_timeout=0.2, batch_size=500
    )
    relay = _relay_args(pg_db, outage_target)
    kills = mid_batch = 0
    leftover: set[str] = set()  # claim tokens the last killed relay left behind

    async def kill_relay() -> None:
        """SIGKILL the relay, preferably while it holds claims of its own (mid-batch)."""
        nonlocal kills, mid_batch, leftover
        with anyio.move_on_after(rng.uniform(0.2, 1.0)):
            while not await anyio.to_thread.run_sync(_claim_tokens, storage) - leftover:
                await anyio.sleep(0.005)
        procs.kill("relay")
        kills += 1
        # Claims this incarnation made and never completed: it died mid-batch.
        held = await anyio.to_thread.run_sync(_claim_tokens, storage)
        if held - leftover:
            mid_batch += 1
        leftover = held

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)  # the group exists before anything is published
            procs.start(
                "writer", "writer",
                "--db", pg_db.url, "--topic", topic, "--accts", ACCTS, "--name", "w",
                "--transactions", "700", "--max-events", "6", "--pause", "0.004",
                "--rollback-rate", "0.05", "--seed", str(rng.randrange(1 << 30)),
            )  # fmt: skip
            await _start_relay(procs, relay)
            deadline = anyio.current_time() + 90
            while kills < MIN_KILLS or procs.alive("writer"):
                assert anyio.current_time() < deadline, "the kill loop did not end"
                await anyio.sleep(rng.uniform(0.05, 0.5))
                await kill_relay()
                if kills == 3:
                    # The broker goes down; a relay starts, meets the outage, is killed too.
                    await anyio.to_thread.run_sync(outage_target.stop)
                    await _start_relay(procs, relay)
                    await anyio.sleep(rng.uniform(0.5, 1.5))
                    await kill_relay()
                    await _start_relay(procs, relay)
                    await anyio.sleep(rng.uniform(0.5, 1.5))
                    await anyio.to_thread.run_sync(outage_target.start)
                    continue
                await _start_relay(procs, relay)
            assert procs.procs["writer"].wait() == 0, procs.tail("writer")
            # The last relay runs undisturbed until everything committed is sent.
            await _wait_for_stats(
                storage, lambda s: s.pending == 0, 90, "relaying every event", procs
            )
            expected = expected_order(storage.engine)
            ids = [e for key_ids in expected.values() for e in key_ids]
            await collector.wait_for(ids, 90, f"consumer on {outage_target.kind}")
            tg.cancel_scope.cancel()
        summary = _outbox_summary(storage)
        dead = await storage.dead_events()
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()
        storage.dispose()

    duplicates = len(collector.messages) - len(collector.ids())
    print(
        f"{outage_target.kind}: {len(ids)} events over {len(expected)} keys, {kills} relay kills "
        f"({mid_batch} holding claims), {len(collector.messages)} deliveries "
        f"({duplicates} repeats)"
    )
    assert procs.unexpected() == []
    assert kills >= MIN_KILLS and mid_batch >= 2, (kills, mid_batch)
    assert len(ids) > 2000
    # At least once, each key in commit order after removing repeats (checked against the
    # application's own versions), nothing that was never committed.
    assert order_problems(collector.pairs(), expected) == []
    # Kills and the outage cost no attempts: nothing refused, nothing dead.
    assert summary == {"statuses": {"SENT": len(ids)}, "max_attempts": 0}
    assert dead == []
    assert procs.stop("relay") == 0


@pytest.mark.slow
@pytest.mark.parametrize("outage_target", ["redis"], indirect=True)
async def test_a_30_second_broker_outage_buries_nothing_in_dead_letters(
    outage_target: Target, pg_db: Db, procs: Procs
) -> None:
    rng = random.Random(_seed())
    storage = create_storage(pg_db.url)
    create_app_tables(storage.engine)
    broker = outage_target.open()
    topic = outage_target.names.topic("acct")
    group = outage_target.names.group("outage")
    collector = Collector()
    runner = ConsumerRunner(
        broker, [topic], group, collector.handle, poll_timeout=0.2, batch_size=500
    )
    # A relay that buries an event after 3 refusals, backing off 0.1 s after each.
    relay = _relay_args(
        pg_db,
        outage_target,
        **{
            "--max-attempts": "3",
            "--retry-backoff": "0.1",
            "--claim-seconds": "5",
            "--batch-keys": "20",
            "--batch-events": "20",
        },
    )
    outage = 30.0
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            await _start_relay(procs, relay)
            procs.start(
                "writer", "writer",
                "--db", pg_db.url, "--topic", topic, "--accts", ACCTS, "--name", "w",
                "--duration", str(outage + 6), "--max-events", "3", "--pause", "0.05",
                "--rollback-rate", "0.05", "--seed", str(rng.randrange(1 << 30)),
            )  # fmt: skip
            await anyio.to_thread.run_sync(procs.wait_ready, "writer")
            await anyio.sleep(2)
            down = time.time()
            await anyio.to_thread.run_sync(outage_target.stop)
            await anyio.sleep(outage)
            await anyio.to_thread.run_sync(outage_target.start)
            up = time.time()
            assert procs.procs["writer"].wait() == 0, procs.tail("writer")
            # After the outage the relay resumes within its backoff (at most 30 s).
            await _wait_for_stats(
                storage, lambda s: s.pending == 0, 90, "relaying every event", procs
            )
            expected = expected_order(storage.engine)
            ids = [e for key_ids in expected.values() for e in key_ids]
            await collector.wait_for(ids, 60, "consumer after the outage")
            tg.cancel_scope.cancel()
        summary = _outbox_summary(storage)
        stats = await storage.outbox_stats()
        dead = await storage.dead_events()
        outbox = storage.tables.outbox
        with storage.engine.connect() as conn:
            during = conn.execute(
                select(func.count()).where(outbox.c.created_at > down, outbox.c.created_at < up)
            ).scalar_one()
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()
        storage.dispose()

    paused = procs.grep("relay paused")
    print(
        f"{len(ids)} events, {during} committed during the {outage:.0f}s outage; "
        f"the relay paused {len(paused)} times"
    )
    assert procs.unexpected() == []
    assert during > 100, "events must keep being committed while the broker is down"
    assert paused, "the relay never met the outage"
    # Nothing buried: no DEAD event, no blocked key, not one attempt counted.
    assert dead == []
    assert (stats.dead, stats.blocked_keys, stats.pending) == (0, 0, 0)
    assert summary == {"statuses": {"SENT": len(ids)}, "max_attempts": 0}
    # Every event delivered, each key in commit order.
    assert order_problems(collector.pairs(), expected) == []
    assert procs.stop("relay") == 0
