"""Worker processes SIGKILLed at many points while sharing one PostgreSQL database.

Two or four worker processes run a mix of sagas (ones that complete, ones that fail late and are
compensated, ones whose compensation is broken). Crash tokens make steps and compensations kill
their own process before acting, after acting but before the record, inside a transactional
step's open transaction, and in the middle of a compensation; meanwhile the test SIGKILLs
workers that hold claims at random moments. Dead workers are restarted until every saga has
settled; then ``verify`` checks, saga by saga, that nothing was lost, duplicated or reordered.

``SAGA_CRASH_SEED=<n>`` replays the same plan (sagas, tokens, kill intervals).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from saga_core import DeclarativeSaga
from tests.recovery.app import (
    ChainFlow,
    Expect,
    OrderFlow,
    PoisonFlow,
    designed,
    start_sagas,
    verify,
)
from tests.recovery.conftest import Database, Workers

CONCURRENCY = 4
LEASE = 1.0
#: how many sagas of each (class, kind)
PLAN: list[tuple[type[DeclarativeSaga], str, int]] = [
    (OrderFlow, "ok", 20),
    (OrderFlow, "fail", 16),
    (OrderFlow, "reject", 10),
    (OrderFlow, "badcomp", 10),
    (ChainFlow, "ok", 20),
    (ChainFlow, "fail", 16),
    (ChainFlow, "badcomp", 10),
]
#: (point, step, how many crashes)
TOKENS = [
    ("before", "charge", 3),
    ("before", "notify", 2),
    ("before", "ship", 2),
    ("before", "a", 2),
    ("before", "c", 2),
    ("after", "charge", 3),
    ("after", "notify", 3),
    ("after", "ship", 2),
    ("after", "b", 2),
    ("after", "d", 2),
    ("tx_after", "reserve", 4),
    ("comp_before", "ship", 2),
    ("comp_before", "b", 2),
    ("comp_before", "charge", 1),
    ("comp_mid", "charge", 2),
    ("comp_mid", "notify", 2),
    ("comp_mid", "reserve", 2),
    ("comp_mid", "a", 2),
    ("comp_after", "ship", 2),
    ("comp_after", "reserve", 2),
    ("comp_after", "d", 2),
    ("comp_after", "c", 2),
]
#: the test's own SIGKILLs of workers holding claims: for this long, one every 0.5-1.5 s
KILL_WINDOW = 30.0
SETTLE_TIMEOUT = 90.0


def _claims(conn: psycopg.Connection[Any]) -> Counter[int]:
    """Live claims per worker pid (lease owner ``host:pid:random``)."""
    rows = conn.execute(
        "SELECT lease_owner FROM saga_sagas WHERE lease_owner IS NOT NULL "
        "AND lease_until > extract(epoch from clock_timestamp())"
    ).fetchall()
    return Counter(int(owner.split(":")[-2]) for (owner,) in rows)


def _unsettled(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT id, saga_type, status, lease_owner, lease_until, "
        "(SELECT string_agg(name || '=' || status || '/' || attempts || 'x' || crashes, ' ' "
        "        ORDER BY position) FROM saga_steps WHERE saga_id = s.id) "
        "FROM saga_sagas s WHERE status NOT IN ('COMPLETED', 'COMPENSATED', 'FAILED') "
        "ORDER BY id"
    ).fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("n_workers", [2, 4], ids=["2-workers", "4-workers"])
def test_sigkilled_workers_settle_every_saga_exactly_as_designed(
    pg_db: Database, make_workers: Any, n_workers: int
) -> None:
    seed = int(os.environ.get("SAGA_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    sagas: list[tuple[str, type[DeclarativeSaga], dict[str, Any]]] = [
        (
            f"{cls.saga_type}-{kind}-{i}",
            cls,
            {"kind": kind, "work": round(rng.uniform(0.02, 0.1), 3)},
        )
        for cls, kind, n in PLAN
        for i in range(n)
    ]
    rng.shuffle(sagas)
    expected = {sid: designed(cls.saga_type, data["kind"]) for sid, cls, data in sagas}
    with psycopg.connect(pg_db.dsn, autocommit=True) as c:
        for point, step_name, n in TOKENS:
            for _ in range(n):
                c.execute(
                    "INSERT INTO crash_tokens (point, step) VALUES (%s, %s)", (point, step_name)
                )
    start_sagas(pg_db.url, sagas)

    workers: Workers = make_workers(pg_db.url, pg_db.dsn, concurrency=CONCURRENCY, lease=LEASE)
    began = time.monotonic()
    for n in range(n_workers):
        workers.start(str(n))
    kills: list[tuple[int, int]] = []  # (pid, claims it held)
    next_kill = began + rng.uniform(0.5, 1.5)
    with psycopg.connect(pg_db.dsn, autocommit=True) as c:
        while True:
            workers.restart_dead()
            unsettled = _unsettled(c)
            now = time.monotonic()
            if not unsettled:
                break
            if now - began > SETTLE_TIMEOUT:
                lines = "\n".join(map(str, unsettled))
                pytest.fail(
                    f"seed {seed}: {len(unsettled)} sagas unsettled after {SETTLE_TIMEOUT:g}s:\n"
                    f"{lines}\n--- worker log tails ---\n"
                    + "\n".join(workers.tail(str(n), 15) for n in range(n_workers)),
                    pytrace=False,
                )
            if now >= next_kill and now - began < KILL_WINDOW:
                claims = _claims(c)
                holders = [s for s in workers.procs if claims[workers.pid(s)] > 0]
                if holders:
                    slot = rng.choice(holders)
                    held = claims[workers.pid(slot)]
                    kills.append((workers.kill(slot), held))
                next_kill = now + rng.uniform(0.5, 1.5)
            time.sleep(0.05)
        settled_after = time.monotonic() - began
        crashes = c.execute(
            "SELECT kind, step, count(*) FROM effects WHERE kind LIKE 'crash:%' GROUP BY 1, 2"
        ).fetchall()
        tokens_left = c.execute("SELECT point, step FROM crash_tokens").fetchall()
    exits = workers.stop_all()

    report = verify(
        pg_db.dsn, pg_db.dsn, expected, killed=workers.killed, lost=workers.lost_sagas()
    )
    figures = {
        "seed": seed,
        "sagas": len(sagas),
        "worker processes": n_workers,
        "settled after s": round(settled_after, 1),
        "test SIGKILLs": len(kills),
        "claims held by killed workers": sum(h for _, h in kills),
        "injected crashes": sum(n for *_, n in crashes),
        "injected crashes by point": {f"{k[6:]}:{s}": n for k, s, n in crashes},
        "worker restarts": workers.restarts,
        "sagas with a lease lost by a live worker": len(workers.lost_sagas()),
        **report.figures,
    }
    print("\nrecovery figures:", json.dumps(figures, indent=1, sort_keys=True))
    assert not workers.unexpected, "workers died without being killed:\n" + "\n".join(
        workers.unexpected
    )
    assert exits == dict.fromkeys(workers.procs, 0), f"workers did not stop cleanly: {exits}"
    assert not workers.errors(), "workers logged errors:\n" + "\n".join(workers.errors()[:50])
    assert not report.problems, f"seed {seed}: invariants broken:\n" + "\n".join(report.problems)
    assert not tokens_left, f"crash points never reached: {tokens_left}"


@pytest.mark.slow
def test_a_step_that_always_kills_its_worker_parks_its_saga(
    pg_db: Database, make_workers: Any
) -> None:
    """A poison step SIGKILLs every worker that runs it: after ``max_crashes`` crashes the saga
    is parked FAILED (crash_loop) instead of killing workers forever; the others complete."""
    max_crashes = 3
    sagas: list[tuple[str, type[DeclarativeSaga], dict[str, Any]]] = [
        ("poison-1", PoisonFlow, {"work": 0.02})
    ]
    sagas += [(f"innocent-{i}", OrderFlow, {"kind": "ok", "work": 0.05}) for i in range(6)]
    expected = {sid: designed(cls.saga_type, "ok") for sid, cls, _ in sagas[1:]}
    expected["poison-1"] = Expect("FAILED", "crash_loop", failed_step="poison")
    with psycopg.connect(pg_db.dsn, autocommit=True) as c:
        for _ in range(10):
            c.execute("INSERT INTO crash_tokens (point, step) VALUES ('before', 'poison')")
    start_sagas(pg_db.url, sagas)
    # One saga per worker at a time: the poison's kills then interrupt no innocent saga.
    workers: Workers = make_workers(
        pg_db.url, pg_db.dsn, concurrency=1, lease=LEASE, max_crashes=max_crashes
    )
    began = time.monotonic()
    for n in range(2):
        workers.start(str(n))
    with psycopg.connect(pg_db.dsn, autocommit=True) as c:
        while _unsettled(c):
            workers.restart_dead()
            assert time.monotonic() - began < 60, _unsettled(c)
            time.sleep(0.05)
        crashes = c.execute(
            "SELECT crashes FROM saga_steps WHERE saga_id = 'poison-1' AND name = 'poison'"
        ).fetchone()
        (tokens_left,) = c.execute("SELECT count(*) FROM crash_tokens").fetchone() or (None,)
    exits = workers.stop_all()
    report = verify(pg_db.dsn, pg_db.dsn, expected, killed=workers.killed)
    assert not report.problems, "\n".join(report.problems)
    assert crashes == (max_crashes,)
    assert tokens_left == 10 - max_crashes, "the parked step ran again"
    assert len(workers.killed) == max_crashes
    assert not workers.unexpected, "\n".join(workers.unexpected)
    assert exits == dict.fromkeys(workers.procs, 0), exits
    assert not workers.errors(), "\n".join(workers.errors())
