"""A worker paused (SIGSTOP) past its lease, resumed (SIGCONT) after another worker took over.

Worker A starts a saga whose first step blocks (on a gate the test controls); the test freezes
A, waits for the lease to expire, and lets worker B claim and complete the saga. Then A is
resumed: it must notice the lost lease, write nothing more for that saga (the saga row, its step
rows and its outbox stay exactly as B left them), and never start the next step. With an async
step A cancels the blocked attempt; a sync step's thread cannot be interrupted, so it may still
finish its own effect once the gate opens, but A records nothing of it.

The last test takes a saga over at the worst moment for its worker, just before its final
status write: the fenced write must find the lease lost and the run end quietly.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import anyio
import psycopg
import pytest

from saga_core import DeclarativeSaga, SagaWorker
from saga_storage import create_storage
from tests.recovery import app
from tests.recovery.app import PauseAsync, PauseSync, start_sagas
from tests.recovery.conftest import Database, Workers, wait_for

LEASE = 1.0
SAGA_ID = "paused-1"


def _snapshot(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Every stored row of the saga: saga row, step rows, outbox rows."""
    return {
        "saga": conn.execute("SELECT * FROM saga_sagas WHERE id = %s", (SAGA_ID,)).fetchall(),
        "steps": conn.execute(
            "SELECT * FROM saga_steps WHERE saga_id = %s ORDER BY position", (SAGA_ID,)
        ).fetchall(),
        "outbox": conn.execute(
            "SELECT * FROM saga_outbox WHERE saga_id = %s ORDER BY id", (SAGA_ID,)
        ).fetchall(),
    }


def _effects(conn: psycopg.Connection[Any], pid: int) -> list[tuple[str, str, int]]:
    return [
        (step, kind, attempt)
        for step, kind, attempt in conn.execute(
            "SELECT step, kind, attempt FROM effects WHERE saga_id = %s AND pid = %s ORDER BY seq",
            (SAGA_ID, pid),
        ).fetchall()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("saga", [PauseAsync, PauseSync], ids=["async-step", "sync-step"])
def test_paused_worker_writes_nothing_after_another_took_over(
    pg_db: Database, make_workers: Any, saga: type[DeclarativeSaga]
) -> None:
    workers: Workers = make_workers(pg_db.url, pg_db.dsn, concurrency=2, lease=LEASE)
    a = workers.start("A")
    start_sagas(pg_db.url, [(SAGA_ID, saga, {})])
    with psycopg.connect(pg_db.dsn, autocommit=True) as c:

        def a_is_holding() -> bool:
            return ("hold", "begin", 1) in _effects(c, a.pid)

        wait_for(a_is_holding, 30, "worker A to start the blocking step")
        os.kill(a.pid, signal.SIGSTOP)
        try:
            time.sleep(LEASE * 2)  # A's lease expires while it is frozen
            b = workers.start("B")

            def completed() -> bool:
                row = c.execute("SELECT status FROM saga_sagas WHERE id = %s", (SAGA_ID,))
                return row.fetchone() == ("COMPLETED",)

            wait_for(completed, 30, "worker B to take the saga over and complete it")
            assert workers.stop("B") == 0, workers.tail("B")
            before = _snapshot(c)
        finally:
            os.kill(a.pid, signal.SIGCONT)

        wait_for(
            lambda: f"saga {SAGA_ID}: lease lost" in workers.tail("A", 200),
            10,
            "worker A to notice it lost the lease",
        )
        c.execute("INSERT INTO gates (saga_id) VALUES (%s)", (SAGA_ID,))
        if saga is PauseSync:
            # The uninterruptible thread finishes its attempt once the gate opens...
            wait_for(
                lambda: ("hold", "do", 1) in _effects(c, a.pid),
                10,
                "A's stalled thread to finish",
            )
        time.sleep(LEASE * 3)  # ample time for A to try renewals and late records
        after = _snapshot(c)
        a_did = _effects(c, a.pid)
        b_did = _effects(c, b.pid)

    assert after == before, "the paused worker wrote for a saga it no longer owned"
    with psycopg.connect(pg_db.dsn) as c:
        hold = c.execute(
            "SELECT status, attempts, crashes, result FROM saga_steps "
            "WHERE saga_id = %s AND name = 'hold'",
            (SAGA_ID,),
        ).fetchone()
    # B re-ran the stalled attempt (counted as a crash) and its result is the one recorded.
    assert hold is not None and hold[:3] == ("SUCCEEDED", 2, 1), hold
    assert str(b.pid) in hold[3], hold
    assert b_did == [
        ("hold", "begin", 2),
        ("hold", "do", 2),
        ("after_hold", "begin", 1),
        ("after_hold", "do", 1),
    ]
    # A never went on to the next step; its blocked attempt was cancelled (async) or, being an
    # uninterruptible thread, finished its own effect without any record (sync).
    last = ("hold", "cancelled", 1) if saga is PauseAsync else ("hold", "do", 1)
    assert a_did == [("hold", "begin", 1), last], a_did
    # A keeps running normally and stops cleanly.
    assert a.poll() is None, workers.tail("A")
    assert workers.stop("A") == 0, workers.tail("A")
    assert not workers.errors(), "workers logged errors:\n" + "\n".join(workers.errors())


class _OvertakenAtFinish:
    """The real storage, except that just before a run's final write another worker takes the
    saga over (bumps the epoch, as a claim after an expired lease does)."""

    def __init__(self, inner: Any, dsn: str) -> None:
        self._inner = inner
        self._dsn = dsn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def write(self, fence: Any, change: Any, **options: Any) -> Any:
        if change.release_lease:
            with psycopg.connect(self._dsn, autocommit=True) as c:
                c.execute(
                    "UPDATE saga_sagas SET lease_owner = 'other-worker', "
                    "lease_epoch = lease_epoch + 1, "
                    "lease_until = extract(epoch from clock_timestamp()) + 60 WHERE id = %s",
                    (fence.saga_id,),
                )
        return await self._inner.write(fence, change, **options)


def test_worker_overtaken_during_its_final_write_stops_quietly(
    pg_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """The fenced final write finds the saga taken over: the run must end as 'lease lost'
    (nothing written, nothing raised), not as an aborted run."""
    storage = create_storage(pg_db.url)
    try:
        start_sagas(pg_db.url, [(SAGA_ID, PauseSync, {})])
        with psycopg.connect(pg_db.dsn, autocommit=True) as c:
            c.execute("INSERT INTO gates (saga_id) VALUES (%s)", (SAGA_ID,))
        worker = SagaWorker(
            _OvertakenAtFinish(storage, pg_db.dsn), sagas=[PauseSync], lease_seconds=5.0
        )
        app.configure(store_url=pg_db.url, effects_dsn=pg_db.dsn)
        try:
            with caplog.at_level("WARNING", logger="saga"):
                assert anyio.run(worker.run_once) == 1
        finally:
            for pool in (app.CONFIG.effects, app.CONFIG.store):
                if pool is not None:
                    pool.close()
            app.CONFIG.effects = app.CONFIG.store = None
        with psycopg.connect(pg_db.dsn) as c:
            row = c.execute(
                "SELECT status, lease_owner FROM saga_sagas WHERE id = %s", (SAGA_ID,)
            ).fetchone()
    finally:
        storage.dispose()
    assert row == ("RUNNING", "other-worker"), row  # the overtaken run wrote nothing
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert not errors, f"a lost lease surfaced as an error: {errors}"
    assert any("lease lost" in r.getMessage() for r in caplog.records)
