"""The saga store's PostgreSQL stops abruptly while sagas run, and comes back on the same port.

The server is a private one (initdb into a temporary directory), so stopping it disturbs no
other test. The "remote services" (the effects table) live in the shared PostgreSQL and stay up
throughout, as they would in production: steps keep acting while the store is gone, and their
records must be made once it is back. Every saga must then end exactly as designed, each step's
effect consistent with the store, transactional rows exactly once.

Two outages: one longer than the lease (every run in flight must stop acting, and the sagas are
resumed after the restart by whichever worker claims them), and a blip shorter than the lease
(the runs keep their leases and retry their writes until the server is back). The server is
stopped while a transactional step holds its transaction open, so the outage always cuts one.
Errors the workers log are printed with the figures, not asserted: a run may abort on an
outage as long as its saga is then finished by a worker.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from saga_core import DeclarativeSaga
from tests.recovery.app import ChainFlow, OrderFlow, conninfo, designed, start_sagas, verify
from tests.recovery.conftest import Database, PrivatePostgres, Workers, prepare_store

WORKERS = 2
CONCURRENCY = 8
SETTLE_TIMEOUT = 90.0


def _statuses(dsn: str) -> Counter[str] | None:
    """Saga count per status, or None while the server is unreachable."""
    try:
        with psycopg.connect(dsn, connect_timeout=2) as c:
            return Counter(
                dict(c.execute("SELECT status, count(*) FROM saga_sagas GROUP BY 1").fetchall())
            )
    except psycopg.OperationalError:
        return None


def _settled(counts: Counter[str] | None) -> int:
    return -1 if counts is None else sum(counts[s] for s in ("COMPLETED", "COMPENSATED", "FAILED"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lease", "outage"),
    [
        # Longer than a lease: every run in flight stops acting; others resume the sagas.
        pytest.param(2.0, 4.0, id="outage-longer-than-lease"),
        # A blip within the lease: the runs keep their leases and retry their writes.
        pytest.param(10.0, 1.5, id="outage-within-lease"),
    ],
)
def test_sagas_finish_as_designed_after_the_store_restarts(
    private_pg: PrivatePostgres,
    pg_db: Database,
    make_workers: Any,
    lease: float,
    outage: float,
) -> None:
    rng = random.Random(7)
    sagas: list[tuple[str, type[DeclarativeSaga], dict[str, Any]]] = [
        (
            f"{cls.saga_type}-{kind}-{i}",
            cls,
            {"kind": kind, "work": round(rng.uniform(0.2, 0.5), 3)},
        )
        for cls, kind, n in [
            (OrderFlow, "ok", 10),
            (OrderFlow, "fail", 6),
            (OrderFlow, "reject", 4),
            (OrderFlow, "badcomp", 4),
            (ChainFlow, "ok", 8),
            (ChainFlow, "fail", 4),
            (ChainFlow, "badcomp", 4),
        ]
        for i in range(n)
    ]
    rng.shuffle(sagas)
    expected = {sid: designed(cls.saga_type, data["kind"]) for sid, cls, data in sagas}
    store_dsn = conninfo(private_pg.url)
    prepare_store(private_pg.url)
    start_sagas(private_pg.url, sagas)

    workers: Workers = make_workers(private_pg.url, pg_db.dsn, concurrency=CONCURRENCY, lease=lease)
    began = time.monotonic()
    for n in range(WORKERS):
        workers.start(str(n))
    # Stop the server once a good part of the work is done, more is in flight, and a
    # transactional step has its transaction open (the outage must cut one).
    deadline = began + 60
    with psycopg.connect(store_dsn, autocommit=True) as c:
        while True:
            progress: Counter[str] = Counter(
                dict(c.execute("SELECT status, count(*) FROM saga_sagas GROUP BY 1").fetchall())
            )
            open_tx = c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
                "AND query LIKE 'INSERT INTO reservations%'"
            ).fetchone()
            if _settled(progress) >= len(sagas) // 4 and open_tx and open_tx[0]:
                break
            assert time.monotonic() < deadline, f"sagas did not progress: {progress}"
            time.sleep(0.01)
        in_flight = c.execute(
            "SELECT count(*) FROM saga_steps WHERE status IN ('RUNNING', 'COMPENSATING')"
        ).fetchone()
    settled_at_stop = _settled(progress)
    private_pg.stop("immediate")
    stopped = time.monotonic()
    time.sleep(outage)
    private_pg.start()
    restarted = time.monotonic()

    while (counts := _statuses(store_dsn)) is None or _settled(counts) < len(sagas):
        workers.reap()
        if time.monotonic() - restarted > SETTLE_TIMEOUT:
            pytest.fail(
                f"{len(sagas) - _settled(counts)} sagas unsettled {SETTLE_TIMEOUT:g}s after the "
                f"restart: {counts}\n--- worker log tails ---\n"
                + "\n".join(workers.tail(str(n), 25) for n in range(WORKERS)),
                pytrace=False,
            )
        time.sleep(0.2)
    settled_after = time.monotonic() - restarted
    workers.reap()
    exits = workers.stop_all()

    report = verify(store_dsn, pg_db.dsn, expected, killed=None)
    errors = workers.errors()
    figures = {
        "sagas": len(sagas),
        "settled before the stop": settled_at_stop,
        "steps in flight at the stop": in_flight[0] if in_flight else None,
        "stopped after s": round(stopped - began, 1),
        "outage s": round(restarted - stopped, 1),
        "settled s after restart": round(settled_after, 1),
        "sagas whose lease a worker lost": len(workers.lost_sagas()),
        "worker log errors": len(errors),
        **report.figures,
    }
    print("\nrestart figures:", json.dumps(figures, indent=1, sort_keys=True))
    if errors:
        print("worker errors:\n" + "\n".join(errors[:40]))
    assert not workers.unexpected, "workers died:\n" + "\n".join(workers.unexpected)
    assert exits == dict.fromkeys(workers.procs, 0), f"workers did not stop cleanly: {exits}"
    assert not report.problems, "after the restart:\n" + "\n".join(report.problems)
