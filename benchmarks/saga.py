"""Saga benchmark: a 3-step chain and a 10-step fan-out, on PostgreSQL and SQLite.

Every step is recorded durably as DESIGN.md section 3 requires: the saga row is created leased
(1 commit), each step's attempt is recorded before it runs (1 commit) and its completion with
its outbox event after it returns (1 commit), and the final status releases the lease
(1 commit): ``2 * steps + 2`` commits per saga. Steps are trivial ``async def`` functions, so
what is measured is the engine and the database, not the work.

- **sequential**: one ``execute()`` after another; latency p50/p99.
- **concurrent**: ``sagas`` ``execute()`` calls started at once in one task group; sagas/s,
  commits per saga (counted on the storage's engine), and lease renewals per saga apart (a
  saga still waiting after a third of its lease renews it, one transaction each).

No broker is attached: step events stay in the outbox (a relay would send them; the outbox
benchmark measures that).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import event, func, select

from benchmarks._measure import Meter, percentile, rate
from benchmarks._peer_runner import run_isolated
from benchmarks._servers import fresh_database
from saga_brokers import create_broker
from saga_core import DeclarativeSaga, SagaOrchestrator, StepContext, step
from saga_core.records import Fence
from saga_storage import SqlStorage, create_storage


class ThreeStepSaga(DeclarativeSaga):
    """reserve -> charge -> ship."""

    saga_type = "bench-three-step"

    @step(name="reserve", aggregate_type="bench")
    async def reserve(self, ctx: StepContext) -> dict[str, Any]:
        return {"reservation": ctx["n"]}

    @step(name="charge", depends_on=["reserve"], aggregate_type="bench")
    async def charge(self, ctx: StepContext) -> dict[str, Any]:
        return {"charge": ctx["n"]}

    @step(name="ship", depends_on=["charge"], aggregate_type="bench")
    async def ship(self, ctx: StepContext) -> dict[str, Any]:
        return {"shipment": ctx["n"]}


class FanOutSaga(DeclarativeSaga):
    """start -> eight parallel branches -> finish (10 steps)."""

    saga_type = "bench-fan-out"

    @step(name="start", aggregate_type="bench")
    async def start(self, ctx: StepContext) -> dict[str, Any]:
        return {"start": 1}

    @step(name="b1", depends_on=["start"], aggregate_type="bench")
    async def b1(self, ctx: StepContext) -> dict[str, Any]:
        return {"b1": 1}

    @step(name="b2", depends_on=["start"], aggregate_type="bench")
    async def b2(self, ctx: StepContext) -> dict[str, Any]:
        return {"b2": 1}

    @step(name="b3", depends_on=["start"], aggregate_type="bench")
    async def b3(self, ctx: StepContext) -> dict[str, Any]:
        return {"b3": 1}

    @step(name="b4", depends_on=["start"], aggregate_type="bench")
    async def b4(self, ctx: StepContext) -> dict[str, Any]:
        return {"b4": 1}

    @step(name="b5", depends_on=["start"], aggregate_type="bench")
    async def b5(self, ctx: StepContext) -> dict[str, Any]:
        return {"b5": 1}

    @step(name="b6", depends_on=["start"], aggregate_type="bench")
    async def b6(self, ctx: StepContext) -> dict[str, Any]:
        return {"b6": 1}

    @step(name="b7", depends_on=["start"], aggregate_type="bench")
    async def b7(self, ctx: StepContext) -> dict[str, Any]:
        return {"b7": 1}

    @step(name="b8", depends_on=["start"], aggregate_type="bench")
    async def b8(self, ctx: StepContext) -> dict[str, Any]:
        return {"b8": 1}

    @step(
        name="finish",
        depends_on=["b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8"],
        aggregate_type="bench",
    )
    async def finish(self, ctx: StepContext) -> dict[str, Any]:
        return {"finish": 1}


SHAPES: dict[str, tuple[type[DeclarativeSaga], int]] = {
    "3-step": (ThreeStepSaga, 3),
    "10-step fan-out": (FanOutSaga, 10),
}


@dataclass(frozen=True)
class SagaSizes:
    """How many sagas each case runs, per shape."""

    sequential: int = 300
    concurrent: dict[str, int] | None = None
    #: Sagas at once for a peer, where not the 3-step count: DBOS runs 33-43 sagas/s here,
    #: about its sequential rate (more with fewer at once, so a ratio against it stays
    #: conservative), and 1,000 of them took a fifth of the quick run. With 5,000 at once it
    #: keeps thousands of threads and falls to 13 sagas/s (the full run then outlived its
    #: 600 s limit), which would flatter the ratio against it.
    peer_concurrent: dict[str, int] | None = None
    #: A broker URL for our orchestrator (``--saga-broker``): each step's event is then
    #: published optimistically as it commits, as in a deployment with a broker. None: no
    #: broker, the events stay in the outbox (what the peers' rows compare with).
    broker: str | None = None

    def concurrent_for(self, shape: str) -> int:
        defaults = {"3-step": 5_000, "10-step fan-out": 1_000}
        return (self.concurrent or defaults)[shape]

    def concurrent_for_peer(self, peer: str) -> int:
        """How many 3-step sagas ``peer`` runs at once."""
        return (self.peer_concurrent or {}).get(peer, self.concurrent_for("3-step"))


QUICK_SAGA = SagaSizes(
    sequential=50,
    concurrent={"3-step": 1_000, "10-step fan-out": 200},
    peer_concurrent={"dbos": 300},
)
FULL_SAGA = SagaSizes(peer_concurrent={"dbos": 1_000})


async def saga_case(storage_kind: str, shape: str, sizes: SagaSizes) -> dict[str, Any]:
    """Sequential latency and concurrent throughput of one saga shape on one storage, measured
    in a new interpreter, as each peer is (:mod:`benchmarks._peer_runner`)."""
    args = {
        "kind": "saga-outbox-saga",
        "storage": storage_kind,
        "shape": shape,
        "sequential": sizes.sequential,
        "concurrent": sizes.concurrent_for(shape),
        "broker": sizes.broker,
    }
    result: dict[str, Any] = await anyio.to_thread.run_sync(run_isolated, args, 900.0)
    result.pop("seconds", None)  # the child's whole run, setup included: not a measurement
    return result


async def saga_case_here(
    storage_kind: str,
    shape: str,
    sizes: SagaSizes,
    before_concurrent: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """``saga_case`` in this process; ``before_concurrent`` is called (in a worker thread)
    once the warm-up and the sequential runs are done."""
    cls, n_steps = SHAPES[shape]
    with fresh_database(storage_kind) as db:
        storage = create_storage(db.url)
        try:
            return await _saga_case(storage, db.kind, shape, cls, n_steps, sizes, before_concurrent)
        finally:
            await storage.aclose()


async def _saga_case(
    storage: SqlStorage,
    kind: str,
    shape: str,
    cls: type[DeclarativeSaga],
    n_steps: int,
    sizes: SagaSizes,
    before_concurrent: Callable[[], None] | None = None,
) -> dict[str, Any]:
    commits = [0]

    def on_commit(_conn: Any) -> None:
        commits[0] += 1

    event.listen(storage.engine, "commit", on_commit)
    # Lease renewals are counted apart (PostgreSQL runs them on an engine of its own).
    renewals = [0]
    renew = storage.renew_leases

    async def counting_renew(owner: str, fences: Sequence[Fence], lease_seconds: float) -> set[str]:
        renewals[0] += 1
        return await renew(owner, fences, lease_seconds)

    storage.renew_leases = counting_renew  # type: ignore[method-assign]
    broker = create_broker(sizes.broker) if sizes.broker else None
    try:
        orchestrator = SagaOrchestrator(storage, broker=broker)
        return await _run_sagas(
            storage,
            orchestrator,
            kind,
            shape,
            cls,
            n_steps,
            sizes,
            commits,
            renewals,
            before_concurrent,
        )
    finally:
        event.remove(storage.engine, "commit", on_commit)
        if broker is not None:
            await broker.aclose()


async def _run_sagas(
    storage: SqlStorage,
    orchestrator: SagaOrchestrator,
    kind: str,
    shape: str,
    cls: type[DeclarativeSaga],
    n_steps: int,
    sizes: SagaSizes,
    commits: list[int],
    renewals: list[int],
    before_concurrent: Callable[[], None] | None,
) -> dict[str, Any]:
    for i in range(5):  # warm-up: pool, statement caches
        await orchestrator.execute(cls, {"n": -i - 1})
    latencies: list[float] = []
    for i in range(sizes.sequential):
        with Meter() as m:
            await orchestrator.execute(cls, {"n": i})
        latencies.append(m.span.wall * 1000)

    n = sizes.concurrent_for(shape)
    if before_concurrent is not None:
        await anyio.to_thread.run_sync(before_concurrent)
    before, renewed = commits[0], renewals[0]
    window = [time.time()]
    failures: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            await orchestrator.execute(cls, {"n": i})
        except Exception as exc:
            failures.append(exc)

    with Meter() as conc:
        await _all_at_once([one(sizes.sequential + i) for i in range(n)])
    window.append(time.time())
    renewed = renewals[0] - renewed
    shared = storage.engine is _lease_engine(storage)  # renewals also counted as commits
    total_commits = commits[0] - before - (renewed if shared else 0)
    completed, steps_ok, events, sent = await anyio.to_thread.run_sync(_stored_counts, storage)
    runs = 5 + sizes.sequential + n
    return {
        "storage": kind,
        "shape": shape if sizes.broker is None else f"{shape}, publishing",
        "broker": sizes.broker,
        "steps": n_steps,
        "sequential": sizes.sequential,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "concurrent": n,
        "sagas_per_s": rate(n, conc.span.wall),
        "commits_per_saga": total_commits / n,
        "renewals_per_saga": renewed / n,
        "cpu_cores": conc.span.cpu_cores,
        "machine_busy_cores": conc.span.machine_busy,
        "failures": len(failures),
        "window": window,
        "completed": completed,
        "steps_succeeded": steps_ok,
        "outbox_events": events,
        # No relay runs: only optimistic publishing (``broker``) sends any.
        "events_sent": sent,
        "consistent": not failures
        and completed == runs
        and steps_ok == runs * n_steps
        and events == runs * n_steps,
    }


async def _all_at_once(runs: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``runs`` concurrently and wait for all: on asyncio as the peers' cases do
    (``asyncio.gather``, a plain task each), elsewhere in an anyio task group. Since anyio
    4.14 a task group's task also carries a handle with a cancel scope and an event, about
    fifteen objects more per saga in flight than the peers' harness pays, which the garbage
    collector walks like the saga's own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        pass
    else:
        await asyncio.gather(*runs)
        return
    async with anyio.create_task_group() as tg:
        for run in runs:
            tg.start_soon(_await, run)


async def _await(run: Coroutine[Any, Any, None]) -> None:
    await run


def _lease_engine(storage: SqlStorage) -> Any:
    """The engine lease renewals commit on (PostgreSQL keeps one of its own)."""
    return getattr(storage, "_lease_engine", None) or storage.engine


def _stored_counts(storage: SqlStorage) -> tuple[int, int, int, int]:
    t = storage.tables
    with storage.engine.connect() as conn:
        completed = conn.execute(
            select(func.count()).select_from(t.sagas).where(t.sagas.c.status == "COMPLETED")
        ).scalar_one()
        steps_ok = conn.execute(
            select(func.count()).select_from(t.steps).where(t.steps.c.status == "SUCCEEDED")
        ).scalar_one()
        events = conn.execute(select(func.count()).select_from(t.outbox)).scalar_one()
        sent = conn.execute(
            select(func.count()).select_from(t.outbox).where(t.outbox.c.status == "SENT")
        ).scalar_one()
    return int(completed), int(steps_ok), int(events), int(sent)
