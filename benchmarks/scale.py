"""Scale-out: the same work split over several processes started together.

One interpreter runs one thread of Python at a time, so one process is bound by one core
(``docs/workers.md``). Sagas and relays scale by adding processes; this measures what that
buys on the machine at hand:

- **sagas**: 3-step sagas, ours and sagaz's, each process running its share at once in a
  schema of its own on the one PostgreSQL server, after its warm-up (so the processes share
  the server, not tables, indexes or lease rows, unlike the workers of a deployment);
- **relay**: PostgreSQL -> Kafka, one outbox drained by several ``OutboxWorker`` processes
  (they claim different keys), against the raw kafka-python rate measured after them.

The measured phases start together (:func:`benchmarks._peer_runner.run_together`) and a rate
is the work of every process over the span from the first start to the last end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import anyio

from benchmarks._measure import Meter
from benchmarks._peer_runner import run_together
from benchmarks._servers import (
    BrokerTarget,
    broker_message_count,
    fresh_database,
    libpq_url,
    postgres_available,
)
from benchmarks.baselines import raw_broker_rate
from benchmarks.outbox import BATCH_EVENTS, BATCH_KEYS, as_messages, commit_events, make_events
from saga_brokers import create_broker
from saga_core import OutboxWorker
from saga_core.events import Message
from saga_storage import create_storage

ENGINES = ("saga-outbox", "sagaz")

#: The process counts each engine runs with, in one case (1 is the reference).
PROCESS_COUNTS = (1, 2)


def _workload(engine: str, per_process: int, db: Any) -> dict[str, Any]:
    if engine == "saga-outbox":
        return {
            "kind": "saga-outbox-saga",
            "storage": "postgresql",
            "shape": "3-step",
            "sequential": 0,
            "concurrent": per_process,
        }
    return {
        "kind": "sagaz-saga",
        "dsn": libpq_url(db.libpq),
        "schema": db.schema,
        "sequential": 0,
        "concurrent": per_process,
        "outbox": False,
    }


async def scale_case(engine: str, sagas: int) -> dict[str, Any]:
    """``sagas`` 3-step sagas on ``engine`` (PostgreSQL) with each of ``PROCESS_COUNTS``
    processes."""
    row: dict[str, Any] = {"engine": engine, "storage": "postgresql", "sagas": sagas, "runs": []}
    if engine == "sagaz" and (
        importlib.util.find_spec("sagaz") is None or importlib.util.find_spec("asyncpg") is None
    ):
        row["skipped"] = "sagaz (with asyncpg) is not installed (pip install 'saga-outbox[bench]')"
        return row
    if not postgres_available():
        row["skipped"] = "PostgreSQL is down"
        return row
    for processes in PROCESS_COUNTS:
        per = max(1, sagas // processes)
        with contextlib.ExitStack() as stack:
            # Ours makes its own database in the child; sagaz's schema is made here.
            dbs = [
                stack.enter_context(fresh_database("postgresql")) if engine == "sagaz" else None
                for _ in range(processes)
            ]
            workloads = [_workload(engine, per, db) for db in dbs]
            results = await anyio.to_thread.run_sync(run_together, workloads, 900.0)
        row["runs"].append(
            {
                "processes": processes,
                "sagas": per * processes,
                "sagas_per_s": per * processes / _span(results),
                **_together(results),
                "per_process": [r["sagas_per_s"] for r in results],
                "consistent": all(r["consistent"] for r in results),
            }
        )
    one = row["runs"][0]["sagas_per_s"]
    for run in row["runs"]:
        run["vs_one_process"] = run["sagas_per_s"] / one
    row["consistent"] = all(run["consistent"] for run in row["runs"])
    return row


def _span(results: list[dict[str, Any]]) -> float:
    start = min(float(r["window"][0]) for r in results)
    end = max(float(r["window"][1]) for r in results)
    return max(end - start, 1e-9)


def _together(results: list[dict[str, Any]]) -> dict[str, Any]:
    """How far apart the processes' measured phases started; whether every one started only
    once all were ready (what the READY/GO barrier guarantees) and whether they overlapped
    (the last to start began before the first to end ended: tiny runs may not)."""
    starts = [float(r["window"][0]) for r in results]
    ends = [float(r["window"][1]) for r in results]
    ready = [float(r["ready_at"]) for r in results]
    return {
        "start_skew_s": max(starts) - min(starts),
        "started_after_all_ready": min(starts) >= max(ready),
        "overlapped": max(starts) < min(ends),
    }


async def relay_scale_case(
    target: BrokerTarget, events: int, per_key: int, commit_batch: int
) -> dict[str, Any]:
    """``events`` committed, then relayed by each of ``PROCESS_COUNTS`` relay processes."""
    row: dict[str, Any] = {
        "storage": "postgresql",
        "broker": target.kind,
        "events": events,
        "runs": [],
    }
    if not postgres_available():
        row["skipped"] = "PostgreSQL is down"
        return row
    messages = None
    for processes in PROCESS_COUNTS:
        with fresh_database("postgresql") as db:
            topic = target.new_topic("scale")
            evs = make_events(topic, events, per_key, "s")
            messages = as_messages(evs)
            storage = create_storage(db.url)
            try:
                await anyio.to_thread.run_sync(commit_events, storage, evs, commit_batch)
                workload = {
                    "kind": "saga-outbox-relay",
                    "url": db.url,
                    "broker": target.url,
                    "topic": topic,
                }
                results = await anyio.to_thread.run_sync(
                    run_together, [workload] * processes, 900.0
                )
                counts = await storage.outbox_counts()
            finally:
                await storage.aclose()
            # Each process warmed its producer up with one message of its own.
            on_broker = await anyio.to_thread.run_sync(
                broker_message_count, target, topic, events + processes
            )
        relayed = sum(r["relayed"] for r in results)
        row["runs"].append(
            {
                "processes": processes,
                "relay_rate": relayed / _span(results),
                **_together(results),
                "per_process": [r["relay_rate"] for r in results],
                "cpu_cores": [r["cpu_cores"] for r in results],
                "relayed": relayed,
                "consistent": relayed == events
                and counts.get("SENT", 0) == events
                and counts.get("PENDING", 0) == 0
                and (on_broker is None or on_broker == events + processes),
            }
        )
    assert messages is not None
    raw = await raw_broker_rate(target, messages, BATCH_KEYS * min(per_key, BATCH_EVENTS))
    row["raw_broker"] = raw
    one = row["runs"][0]["relay_rate"]
    for run in row["runs"]:
        run["vs_one_process"] = run["relay_rate"] / one
        run["vs_raw_broker"] = run["relay_rate"] / raw["rate"]
    row["consistent"] = all(run["consistent"] for run in row["runs"])
    return row


async def relay_in_child(args: dict[str, Any], before: Callable[[], None]) -> dict[str, Any]:
    """One relay process of :func:`relay_scale_case` (run by :mod:`benchmarks._peer_runner`);
    ``before`` is called (in a worker thread) once it is warmed up."""
    storage = create_storage(args["url"])
    broker = create_broker(args["broker"])
    try:
        # Warm-up: the producer's connection and the topic's metadata.
        warm = Message(args["topic"], "warm-up", b"{}", {"event_id": "warm-up"})
        assert await broker.publish([warm]) == [None]
        worker = OutboxWorker(storage, broker, batch_keys=BATCH_KEYS, batch_events=BATCH_EVENTS)
        await anyio.to_thread.run_sync(before)
        window = [time.time()]
        with Meter() as m:
            relayed = await worker.drain()
        window.append(time.time())
    finally:
        await broker.aclose()
        await storage.aclose()
    return {
        "relayed": relayed,
        "relay_rate": relayed / max(m.span.wall, 1e-9),
        "cpu_cores": m.span.cpu_cores,
        "window": window,
    }
