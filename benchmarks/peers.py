"""Peers: the same workloads on sagaz and DBOS (installed from PyPI with the ``bench`` extra).

Each peer runs in a subprocess of its own (:mod:`benchmarks._peer_runner`) against a fresh
PostgreSQL schema, so their process-wide state (logging set-up, singletons, threads) never
touches ours. A peer that is not installed or fails is reported with the reason; the rest of
the suite goes on.

What each persists matters more than its speed, so every row says it (``PERSISTS``).
"""

from __future__ import annotations

import importlib.util
import subprocess
from typing import Any

import anyio

from benchmarks._peer_runner import run_isolated
from benchmarks._servers import RABBIT_URL, REDIS_URL, fresh_database, libpq_url, postgres_available

#: What each engine writes for one 3-step saga; shown beside its numbers.
PERSISTS: dict[str, str] = {
    "saga-outbox": (
        "every transition, fenced by the lease: the saga row with its root steps' first "
        "attempts; each step's result + outbox event with the first attempts of the steps it "
        "unblocks (the final status with the last one), one transaction; a 3-step saga alone "
        "commits 4 times, concurrent sagas share commits (group commit), each caller going on "
        "only after its own commit; a crash resumes at the step that was running"
    ),
    "sagaz": (
        "saga row upserted at start and at end (2 commits); no per-step record (its "
        "declarative runner passes steps=[]); storage errors are logged and ignored; "
        "a crash mid-saga leaves it EXECUTING with nothing to resume from"
    ),
    "sagaz+outbox": (
        "as sagaz, plus one outbox row per step success and per saga completion, each its "
        "own autocommit INSERT, not in the transaction of any state write"
    ),
    "dbos": (
        "workflow_status row at start, one operation_outputs row per step after it returns "
        "(a checkpoint: recovery replays the workflow and skips recorded steps), status at end"
    ),
    "sagaz-outbox": (
        "one row per event; relay claims rows (not keys), publishes a batch concurrently "
        "(no per-key order), then one UPDATE per event; RabbitMQ without mandatory "
        "(an unroutable message counts as sent)"
    ),
}

#: Why a peer workload is not run here, by (peer, broker).
NOT_RUN = {
    ("sagaz-outbox", "kafka"): "sagaz's Kafka broker needs aiokafka, not in the bench extra",
}


def peer_available(module: str) -> str | None:
    """``None`` if ``module`` can be imported, else why not."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install 'saga-outbox[bench]')"
    return None


async def peer_saga(peer: str, sequential: int, concurrent: int) -> dict[str, Any]:
    """The 3-step saga on ``peer`` ("sagaz", "sagaz+outbox" or "dbos") on PostgreSQL."""
    module = "dbos" if peer == "dbos" else "sagaz"
    row: dict[str, Any] = {
        "peer": peer,
        "workload": "3-step saga",
        "storage": "postgresql",
        "sequential": sequential,
        "concurrent": concurrent,
        "persists": PERSISTS[peer],
    }
    why = peer_available(module) or (None if postgres_available() else "PostgreSQL is down")
    if why is None and module == "sagaz" and importlib.util.find_spec("asyncpg") is None:
        why = "asyncpg is not installed (sagaz's PostgreSQL storage needs it)"
    if why is not None:
        row["skipped"] = why
        return row
    with fresh_database("postgresql") as db:
        args = {
            "kind": "dbos-workflow" if peer == "dbos" else "sagaz-saga",
            "dsn": libpq_url(db.libpq),
            "schema": db.schema,
            "sequential": sequential,
            "concurrent": concurrent,
            "outbox": peer == "sagaz+outbox",
        }
        try:
            row.update(await anyio.to_thread.run_sync(run_isolated, args, 600.0))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            row["skipped"] = f"failed: {exc}"
    return row


#: sagaz's own default. Its worker publishes a whole batch concurrently: with 1,000 the
#: redis-py pool ran out of connections ("Too many connections") and events went to its
#: dead-letter state, so its default is kept.
SAGAZ_BATCH = 100


async def peer_outbox(broker: str, events: int, per_key: int, commit_batch: int) -> dict[str, Any]:
    """The outbox workload on sagaz's ``OutboxWorker`` (PostgreSQL storage)."""
    row: dict[str, Any] = {
        "peer": "sagaz",
        "workload": "outbox",
        "storage": "postgresql",
        "broker": broker,
        "events": events,
        "persists": PERSISTS["sagaz-outbox"],
    }
    why = NOT_RUN.get(("sagaz-outbox", broker)) or peer_available("sagaz")
    if why is None and not postgres_available():
        why = "PostgreSQL is down"
    if why is not None:
        row["skipped"] = why
        return row
    with fresh_database("postgresql") as db:
        args = {
            "kind": "sagaz-outbox",
            "dsn": libpq_url(db.libpq),
            "schema": db.schema,
            "broker": broker,
            "redis_url": REDIS_URL,
            "amqp_url": RABBIT_URL,
            "events": events,
            "per_key": per_key,
            "commit_batch": commit_batch,
            "round": SAGAZ_BATCH,
        }
        try:
            row.update(await anyio.to_thread.run_sync(run_isolated, args, 600.0))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            row["skipped"] = f"failed: {exc}"
    return row
