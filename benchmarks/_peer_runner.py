"""Runs one workload in a process of its own: ``python -m benchmarks._peer_runner JSON``.

Peers set process-wide state on import (sagaz calls ``logging.basicConfig``; DBOS is a
singleton with threads of its own), so each runs isolated and prints one JSON line. Our own
saga cases run the same way, so that every engine starts from a fresh interpreter: a process
that already ran the other cases holds more objects, and each full pass of the garbage
collector walks all of them. A peer's PostgreSQL schema is created and dropped by the parent
(:mod:`benchmarks.peers`); our cases make their own database as in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Literal

from benchmarks._measure import Meter, apply_gc_threshold, percentile, rate


def _command(args: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "benchmarks._peer_runner", json.dumps(args)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("LOG_LEVEL", "WARNING")  # sagaz configures the root logger from it
    return env


def _result(stdout: str, returncode: int | None, stderr: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("PEER-RESULT "):
            result: dict[str, Any] = json.loads(line[len("PEER-RESULT ") :])
            return result
    raise RuntimeError(_failure(returncode or 0, stderr))


def run_isolated(args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the workload ``args`` describes in a new interpreter; its result, or RuntimeError."""
    proc = subprocess.run(
        _command(args), capture_output=True, text=True, timeout=timeout, env=_env(), check=False
    )
    return _result(proc.stdout, proc.returncode, proc.stderr)


def run_together(workloads: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Run several workloads, each in a new interpreter, with their measured phases started
    together: each child says ``READY`` once set up and warmed up, and waits for ``GO``
    (:func:`barrier`). Their results in order, or RuntimeError if any failed."""
    deadline = time.monotonic() + timeout
    children: list[tuple[subprocess.Popen[str], Any]] = []
    with contextlib.ExitStack() as files:
        try:
            for args in workloads:
                # A file, not a pipe: a pipe nobody reads could fill up and block the child.
                err = files.enter_context(tempfile.TemporaryFile(mode="w+"))
                child = subprocess.Popen(
                    _command({**args, "barrier": True}),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    env=_env(),
                )
                children.append((child, err))
            for child, err in children:
                said = _wait_ready(child, deadline)
                if said == "late":
                    raise RuntimeError(f"a child was not ready within {timeout:g}s")
                if said == "ended":
                    # Its output ended: it is exiting, though it may not have been reaped yet.
                    err.seek(0)
                    raise RuntimeError(
                        "a child ended before its measured phase: "
                        + _failure(child.wait(), err.read())
                    )
            for child, _ in children:
                assert child.stdin is not None
                child.stdin.write("GO\n")
                child.stdin.flush()  # communicate() closes it
            results = []
            for child, err in children:
                out, _ = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
                err.seek(0)
                results.append(_result(out, child.returncode, err.read()))
            return results
        finally:
            for child, _ in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                for pipe in (child.stdin, child.stdout):  # communicate() closed them if it ran
                    if pipe is not None and not pipe.closed:
                        with contextlib.suppress(OSError):
                            pipe.close()


def _wait_ready(child: subprocess.Popen[str], deadline: float) -> Literal["ready", "ended", "late"]:
    """Whether ``child`` said READY before ``deadline``, ended its output without saying it,
    or is still silent at the deadline (read in a thread: a pipe read has no timeout, and a
    child stuck in its set-up must not hang the suite; the caller kills it). "ended" is told
    by the end of the output, not by ``poll()``: a child closes its output a moment before it
    can be reaped, and in that moment it has ended, not run late."""
    said: list[Literal["ready", "ended"]] = []

    def read() -> None:
        assert child.stdout is not None
        try:
            while line := child.stdout.readline():
                if line.strip() == "READY":
                    said.append("ready")
                    return
        except (OSError, ValueError):  # the pipe closed under us: the child was killed
            pass
        said.append("ended")

    reader = threading.Thread(target=read, name="saga-bench-ready", daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    return said[0] if said else "late"


def _failure(returncode: int, stderr: str) -> str:
    tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"exit {returncode}: {tail[:300]}"


#: When this child said READY (wall clock, comparable across the processes of a run).
_ready_at: list[float] = []


def barrier(args: dict[str, Any]) -> None:
    """In a child of :func:`run_together`: say ``READY``, then wait for ``GO``."""
    if not args.get("barrier"):
        return
    _ready_at.append(time.time())
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        raise SystemExit("the parent did not say GO")


def _quiet() -> None:
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("sagaz", "dbos"):
        logging.getLogger(name).setLevel(logging.WARNING)


# --- sagaz sagas --------------------------------------------------------------------------
async def sagaz_saga(args: dict[str, Any]) -> dict[str, Any]:
    """The 3-step saga on sagaz's declarative ``Saga`` with ``PostgreSQLSagaStorage``."""
    import asyncpg
    from sagaz import Saga, SagaConfig, action, configure
    from sagaz.core.storage.backends.postgresql.saga import PostgreSQLSagaStorage

    _quiet()
    dsn, schema = args["dsn"], args["schema"]
    storage = PostgreSQLSagaStorage(
        dsn, pool_min_size=2, pool_max_size=10, server_settings={"search_path": schema}
    )
    outbox = None
    config: dict[str, Any] = {"storage": storage, "logging": False, "metrics": False}
    if args.get("outbox"):
        from sagaz.core.outbox.brokers.memory import InMemoryBroker
        from sagaz.core.storage.backends.postgresql.outbox import PostgreSQLOutboxStorage

        outbox = PostgreSQLOutboxStorage(dsn, pool_min_size=2, pool_max_size=10)
        outbox._pool = await asyncpg.create_pool(
            dsn, min_size=2, max_size=10, server_settings={"search_path": schema}
        )
        async with outbox._pool.acquire() as conn:
            from sagaz.core.storage.backends.postgresql.outbox import OUTBOX_SCHEMA

            await conn.execute(OUTBOX_SCHEMA)
        broker = InMemoryBroker()
        await broker.connect()
        config.update(broker=broker, outbox_storage=outbox)
    configure(SagaConfig(tracing=False, **config))

    class ThreeStep(Saga):  # type: ignore[misc]
        saga_name = "bench-three-step"

        @action("reserve")  # type: ignore[untyped-decorator]
        async def reserve(self, ctx: dict[str, Any]) -> dict[str, Any]:
            return {"reservation": ctx["n"]}

        @action("charge", depends_on=["reserve"])  # type: ignore[untyped-decorator]
        async def charge(self, ctx: dict[str, Any]) -> dict[str, Any]:
            return {"charge": ctx["n"]}

        @action("ship", depends_on=["charge"])  # type: ignore[untyped-decorator]
        async def ship(self, ctx: dict[str, Any]) -> dict[str, Any]:
            return {"shipment": ctx["n"]}

    for i in range(5):
        await ThreeStep().run({"n": -i - 1})
    latencies = []
    for i in range(args["sequential"]):
        with Meter() as m:
            await ThreeStep().run({"n": i})
        latencies.append(m.span.wall * 1000)
    n = args["concurrent"]
    await asyncio.to_thread(barrier, args)
    window = [time.time()]
    with Meter() as conc:
        results = await asyncio.gather(
            *(ThreeStep().run({"n": i}) for i in range(n)), return_exceptions=True
        )
    window.append(time.time())
    failures = sum(isinstance(r, BaseException) for r in results)
    pool = await storage._get_pool()
    async with pool.acquire() as conn:
        completed = await conn.fetchval("SELECT count(*) FROM sagas WHERE status = 'completed'")
        step_rows = await conn.fetchval("SELECT count(*) FROM saga_steps")
        events = (
            await conn.fetchval("SELECT count(*) FROM saga_outbox") if outbox is not None else 0
        )
    await pool.close()
    if outbox is not None:
        await outbox.close()
    runs = 5 + args["sequential"] + n
    return {
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "sagas_per_s": rate(n, conc.span.wall),
        "cpu_cores": conc.span.cpu_cores,
        "failures": failures,
        "completed": completed,
        "step_rows": step_rows,
        "outbox_rows": events,
        "rows_per_saga": (completed + step_rows + events) / runs,
        "consistent": failures == 0 and completed == runs,
        "window": window,
    }


# --- dbos workflows -----------------------------------------------------------------------
def dbos_workflow(args: dict[str, Any]) -> dict[str, Any]:
    """A 3-step DBOS workflow (each step an ``@DBOS.step``, checkpointed in PostgreSQL)."""
    import sqlalchemy as sa
    from dbos import DBOS, DBOSConfig

    _quiet()
    commits = [0]

    def on_commit(_conn: Any) -> None:
        commits[0] += 1

    sa.event.listen(sa.engine.Engine, "commit", on_commit)
    config: DBOSConfig = {
        "name": "saga-bench",
        "system_database_url": args["dsn"],
        "dbos_system_schema": args["schema"],
        "log_level": "WARNING",
    }
    DBOS(config=config)

    # Registered by calls, not decorators: mypy sees DBOS typed when it is installed and as
    # Any when it is not (CI has no peers), and a decorator would need an ignore in one case.
    async def reserve_fn(n: int) -> dict[str, Any]:
        return {"reservation": n}

    async def charge_fn(n: int) -> dict[str, Any]:
        return {"charge": n}

    async def ship_fn(n: int) -> dict[str, Any]:
        return {"shipment": n}

    reserve = DBOS.step()(reserve_fn)
    charge = DBOS.step()(charge_fn)
    ship = DBOS.step()(ship_fn)

    async def three_step_fn(n: int) -> dict[str, Any]:
        out: dict[str, Any] = {"n": n}
        out.update(await reserve(n))
        out.update(await charge(n))
        out.update(await ship(n))
        return out

    three_step = DBOS.workflow()(three_step_fn)

    async def main() -> dict[str, Any]:
        DBOS.launch()
        for i in range(5):
            await three_step(-i - 1)
        latencies = []
        for i in range(args["sequential"]):
            with Meter() as m:
                await three_step(i)
            latencies.append(m.span.wall * 1000)
        n = args["concurrent"]
        before = commits[0]
        with Meter() as conc:
            results = await asyncio.gather(
                *(three_step(i) for i in range(n)), return_exceptions=True
            )
        made = commits[0] - before
        return {
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "sagas_per_s": rate(n, conc.span.wall),
            "commits_per_saga": made / n,
            "cpu_cores": conc.span.cpu_cores,
            "failures": sum(isinstance(r, BaseException) for r in results),
        }

    try:
        out = asyncio.run(main())
    finally:
        DBOS.destroy(destroy_registry=True)
    engine = sa.create_engine(args["dsn"].replace("postgresql://", "postgresql+psycopg://", 1))
    schema = args["schema"]
    with engine.connect() as conn:
        completed = conn.execute(
            sa.text(f"SELECT count(*) FROM {schema}.workflow_status WHERE status = 'SUCCESS'")
        ).scalar_one()
        steps = conn.execute(
            sa.text(f"SELECT count(*) FROM {schema}.operation_outputs")
        ).scalar_one()
    engine.dispose()
    runs = 5 + args["sequential"] + args["concurrent"]
    out.update(
        completed=completed,
        step_rows=steps,
        rows_per_saga=(completed + steps) / runs,
        consistent=out["failures"] == 0 and completed == runs and steps == 3 * runs,
    )
    return out


# --- sagaz outbox -------------------------------------------------------------------------
async def sagaz_outbox(args: dict[str, Any]) -> dict[str, Any]:
    """N events inserted in transactions of ``commit_batch``, then relayed by sagaz's
    ``OutboxWorker.process_batch()`` until nothing is left."""
    import asyncpg
    from sagaz.core.outbox.types import OutboxConfig, OutboxEvent
    from sagaz.core.outbox.worker import OutboxWorker
    from sagaz.core.storage.backends.postgresql.outbox import (
        OUTBOX_SCHEMA,
        PostgreSQLOutboxStorage,
    )

    _quiet()
    dsn, schema = args["dsn"], args["schema"]
    storage = PostgreSQLOutboxStorage(dsn)
    storage._pool = await asyncpg.create_pool(
        dsn, min_size=2, max_size=10, server_settings={"search_path": schema}
    )
    async with storage._pool.acquire() as conn:
        await conn.execute(OUTBOX_SCHEMA)
    broker_kind = args["broker"]
    stream = args.get("topic") or f"saga-bench-{uuid.uuid4().hex[:8]}.sagaz"
    broker: Any
    if broker_kind == "memory":
        from sagaz.core.outbox.brokers.memory import InMemoryBroker

        broker = InMemoryBroker()
    elif broker_kind == "redis":
        from sagaz.core.outbox.brokers.redis import RedisBroker, RedisBrokerConfig

        broker = RedisBroker(
            RedisBrokerConfig(url=args["redis_url"], stream_name=stream, max_stream_length=10**9)
        )
    elif broker_kind == "rabbitmq":
        from sagaz.core.outbox.brokers.rabbitmq import RabbitMQBroker, RabbitMQBrokerConfig

        broker = RabbitMQBroker(RabbitMQBrokerConfig(url=args["amqp_url"], exchange_name=stream))
    else:
        raise ValueError(f"sagaz outbox on {broker_kind!r} is not run by this suite")
    await broker.connect()
    if broker_kind == "rabbitmq":
        # sagaz publishes without ``mandatory``: bind a queue so nothing is silently dropped.
        queue = await broker._channel.declare_queue(f"{stream}.q", durable=True)
        await queue.bind(broker._exchange, "#")
    n, per_key, batch = args["events"], args["per_key"], args["commit_batch"]
    events = [
        OutboxEvent(
            saga_id=f"k-{i // per_key}",
            aggregate_type="bench",
            aggregate_id=f"k-{i // per_key}",
            event_type="bench_step_completed",
            payload={
                "saga_id": f"k-{i // per_key}",
                "step": f"step_{i % per_key}",
                "result": {"order_id": i, "amount": 42.5, "currency": "EUR"},
                "occurred_at": "2025-01-01T00:00:00.000000+00:00",
            },
        )
        for i in range(n)
    ]
    pool = storage._pool
    with Meter() as commit:
        for s in range(0, n, batch):
            async with pool.acquire() as conn, conn.transaction():
                for e in events[s : s + batch]:
                    await storage.insert(e, connection=conn)
    worker = OutboxWorker(storage, broker, OutboxConfig(batch_size=args["round"]))
    relayed = 0
    with Meter() as relay:
        while True:
            done = await worker.process_batch()
            if done == 0:
                break
            relayed += done
    async with pool.acquire() as conn:
        sent = await conn.fetchval("SELECT count(*) FROM saga_outbox WHERE status = 'sent'")
    on_broker: int | None = None
    if broker_kind == "redis":
        on_broker = int(await broker._client.xlen(stream))
        await broker._client.delete(stream)
    elif broker_kind == "memory":
        on_broker = sum(len(v) for v in broker._messages.values())
    elif broker_kind == "rabbitmq":
        on_broker = await _rabbit_count_and_delete(args["amqp_url"], stream, n)
    await broker.close()
    await storage.close()
    return {
        "commit_rate": rate(n, commit.span.wall),
        "relay_rate": rate(relayed, relay.span.wall),
        "end_to_end_rate": rate(n, commit.span.wall + relay.span.wall),
        "relay_cpu_cores": relay.span.cpu_cores,
        "relayed": relayed,
        "sent": sent,
        "on_broker": on_broker,
        "consistent": relayed == n and sent == n and on_broker == n,
    }


async def _rabbit_count_and_delete(url: str, exchange: str, expected: int) -> int:
    """Messages in the queue bound to ``exchange`` (counted on a connection of our own), then
    the queue and exchange are deleted."""
    import aio_pika

    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        count = 0
        for _ in range(20):  # the queue's count can trail the confirms a little
            queue = await channel.declare_queue(f"{exchange}.q", durable=True, passive=True)
            count = int(queue.declaration_result.message_count or 0)
            if count >= expected:
                break
            await asyncio.sleep(0.1)
        await channel.queue_delete(f"{exchange}.q")
        await channel.exchange_delete(exchange)
    return count


# --- ours -----------------------------------------------------------------------------------
async def ours_saga(args: dict[str, Any]) -> dict[str, Any]:
    """One of our saga cases (:func:`benchmarks.saga.saga_case_here`)."""
    from benchmarks.saga import SagaSizes, saga_case_here

    sizes = SagaSizes(
        sequential=args["sequential"],
        concurrent={args["shape"]: args["concurrent"]},
        broker=args.get("broker"),
    )
    return await saga_case_here(
        args["storage"], args["shape"], sizes, before_concurrent=functools.partial(barrier, args)
    )


def main() -> None:
    args = json.loads(sys.argv[1])
    apply_gc_threshold()  # the same collector settings as the parent run
    started = time.perf_counter()
    kind = args["kind"]
    if kind == "sagaz-saga":
        out = asyncio.run(sagaz_saga(args))
    elif kind == "dbos-workflow":
        out = dbos_workflow(args)
    elif kind == "sagaz-outbox":
        out = asyncio.run(sagaz_outbox(args))
    elif kind == "saga-outbox-saga":
        out = asyncio.run(ours_saga(args))
    elif kind == "saga-outbox-relay":
        from benchmarks.scale import relay_in_child

        out = asyncio.run(relay_in_child(args, functools.partial(barrier, args)))
    else:
        raise SystemExit(f"unknown peer workload {kind!r}")
    out["seconds"] = time.perf_counter() - started
    out["gc_threshold"] = list(gc.get_threshold())
    if _ready_at:
        out["ready_at"] = _ready_at[0]
    print("PEER-RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
