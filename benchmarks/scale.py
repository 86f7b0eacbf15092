"""Scale-out: the same 3-step saga workload split over several processes, ours and sagaz's.

One interpreter runs one thread of Python at a time, so one process is bound by one core
(``docs/workers.md``). Both engines scale by adding processes on the same PostgreSQL server;
this measures what that buys on the machine at hand. Each process runs its share of the
sagas at once in its own schema, after its warm-up; the measured phases start together
(:func:`benchmarks._peer_runner.run_together`) and the rate is every saga of every process
over the span from the first start to the last end.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import anyio

from benchmarks._peer_runner import run_together
from benchmarks._servers import fresh_database, libpq_url, postgres_available

ENGINES = ("saga-outbox", "sagaz")

#: The process counts each engine runs with, in one case (1 is the reference).
PROCESS_COUNTS = (1, 2)


def _workload(engine: str, storage: str, per_process: int, db: Any) -> dict[str, Any]:
    if engine == "saga-outbox":
        return {
            "kind": "saga-outbox-saga",
            "storage": storage,
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


async def scale_case(engine: str, sagas: int, storage: str = "postgresql") -> dict[str, Any]:
    """``sagas`` 3-step sagas on ``engine`` with each of ``PROCESS_COUNTS`` processes."""
    row: dict[str, Any] = {"engine": engine, "storage": storage, "sagas": sagas, "runs": []}
    if engine == "sagaz" and (
        importlib.util.find_spec("sagaz") is None or importlib.util.find_spec("asyncpg") is None
    ):
        row["skipped"] = "sagaz (with asyncpg) is not installed (pip install 'saga-outbox[bench]')"
        return row
    if storage == "postgresql" and not postgres_available():
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
            workloads = [_workload(engine, storage, per, db) for db in dbs]
            results = await anyio.to_thread.run_sync(run_together, workloads, 900.0)
        start = min(r["window"][0] for r in results)
        end = max(r["window"][1] for r in results)
        row["runs"].append(
            {
                "processes": processes,
                "sagas": per * processes,
                "sagas_per_s": per * processes / max(end - start, 1e-9),
                "per_process": [r["sagas_per_s"] for r in results],
                "consistent": all(r["consistent"] for r in results),
            }
        )
    one = row["runs"][0]["sagas_per_s"]
    for run in row["runs"]:
        run["vs_one_process"] = run["sagas_per_s"] / one
    row["consistent"] = all(run["consistent"] for run in row["runs"])
    return row
