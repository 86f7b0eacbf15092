"""The application the recovery tests run: saga classes, a worker entry point, and the checker.

Workers run as real processes (``python -m tests.recovery.app worker --store URL --effects URL``)
and are killed with SIGKILL. Every step and compensation records what it does in an ``effects``
table through an autocommit connection of its own (so the record survives the kill that follows
it), with a global sequence number, the attempt, the pid, and what the saga store said when it
started (status, attempt count, lease owner). ``verify`` then checks the store and the effects
against what each saga was designed to do.

Crashes are injected through ``crash_tokens``: a step that reaches a crash point takes a token
for (point, step) with one atomic ``DELETE ... RETURNING`` and, if it got one, SIGKILLs its own
process right there. Points: ``before`` (step started, nothing done), ``after`` (effect done, not
yet recorded), ``tx_after`` (a transactional step's row written in the still open transaction),
``comp_before``, ``comp_mid`` (half of the compensation done) and ``comp_after`` (compensation
done, not yet recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from saga_core import (
    DeclarativeSaga,
    RetryPolicy,
    SagaWorker,
    StepContext,
    StepRejected,
    compensate,
    step,
)

T = TypeVar("T")

# --- tables of the application ---------------------------------------------------------------

#: In the database of the effects ("the remote services"): never restarted by a test.
EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS effects (
    seq bigserial PRIMARY KEY,
    saga_id text NOT NULL,
    step text NOT NULL,
    kind text NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    entry_status text,
    entry_attempts int,
    entry_owner text,
    at double precision NOT NULL DEFAULT extract(epoch from clock_timestamp())
);
CREATE TABLE IF NOT EXISTS crash_tokens (
    id serial PRIMARY KEY,
    point text NOT NULL,
    step text NOT NULL
);
CREATE TABLE IF NOT EXISTS gates (saga_id text PRIMARY KEY);
"""

#: In the saga store's database: what transactional steps write through ``ctx.connection``.
STORE_DDL = """
CREATE TABLE IF NOT EXISTS reservations (
    id bigserial PRIMARY KEY,
    saga_id text NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL
);
"""

_TAKE_TOKEN = """
WITH t AS (
    DELETE FROM crash_tokens
    WHERE id = (SELECT id FROM crash_tokens WHERE point = %(point)s AND step = %(step)s
                LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING point
)
INSERT INTO effects (saga_id, step, kind, attempt, pid)
SELECT %(saga)s, %(step)s, 'crash:' || point, %(attempt)s, %(pid)s FROM t
RETURNING seq
"""


def conninfo(sqlalchemy_url: str) -> str:
    """The libpq URI of a ``postgresql+psycopg://`` URL (its ``options`` query kept)."""
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(False)


class _Pool:
    """A few autocommit connections reused across step threads (a broken one is dropped)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._free: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            c = self._free.pop() if self._free else None
        if c is None:
            c = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        try:
            yield c
        except BaseException:
            c.close()
            raise
        with self._lock:
            self._free.append(c)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for c in free:
            c.close()


@dataclass
class _Config:
    effects: _Pool | None = None
    store: _Pool | None = None


CONFIG = _Config()


def configure(*, store_url: str, effects_dsn: str) -> None:
    """Point the steps at the saga store (for entry checks) and at the effects database."""
    CONFIG.store = _Pool(conninfo(store_url))
    CONFIG.effects = _Pool(effects_dsn)


def _effects() -> _Pool:
    assert CONFIG.effects is not None, "tests.recovery.app.configure() was not called"
    return CONFIG.effects


# --- what steps record -------------------------------------------------------------------------


def _entry_state(ctx: StepContext, compensating: bool) -> tuple[str | None, int | None, str | None]:
    """What the store says as the step starts (best effort: the store may be down)."""
    if CONFIG.store is None:
        return None, None, None
    column = "compensation_attempts" if compensating else "attempts"
    try:
        with CONFIG.store.conn() as c:
            row = c.execute(
                f"SELECT st.status, st.{column}, sa.lease_owner FROM saga_steps st "
                "JOIN saga_sagas sa ON sa.id = st.saga_id "
                "WHERE st.saga_id = %s AND st.name = %s",
                (ctx.saga_id, ctx.step),
            ).fetchone()
    except psycopg.Error:
        return None, None, None
    return (row[0], row[1], row[2]) if row else (None, None, None)


def record(ctx: StepContext, kind: str) -> None:
    """Append one effect row (autocommit: it exists even if the process dies right after)."""
    entry: tuple[str | None, int | None, str | None] = (None, None, None)
    if kind in ("begin", "undo_begin"):
        entry = _entry_state(ctx, compensating=kind == "undo_begin")
    with _effects().conn() as c:
        c.execute(
            "INSERT INTO effects (saga_id, step, kind, attempt, pid, entry_status, "
            "entry_attempts, entry_owner) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (ctx.saga_id, ctx.step, kind, ctx.attempt, os.getpid(), *entry),
        )


def crash_point(ctx: StepContext, point: str) -> None:
    """SIGKILL this process here if a crash token for (point, step) is left."""
    with _effects().conn() as c:
        took = c.execute(
            _TAKE_TOKEN,
            {
                "point": point,
                "step": ctx.step,
                "saga": ctx.saga_id,
                "attempt": ctx.attempt,
                "pid": os.getpid(),
            },
        ).fetchone()
    if took is None:
        return
    sys.stderr.write(f"injected crash at {point} of {ctx.step} in saga {ctx.saga_id}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached: SIGKILL cannot be caught


def gate_open(saga_id: str) -> bool:
    with _effects().conn() as c:
        return (
            c.execute("SELECT 1 FROM gates WHERE saga_id = %s", (saga_id,)).fetchone() is not None
        )


async def _bg(fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(fn, *args)


def _work(ctx: StepContext) -> float:
    return float(ctx.get("work", 0.0))


def forward(ctx: StepContext, fail: bool = False, reject: bool = False) -> None:
    """A sync forward step: start, maybe crash, work, maybe refuse, act, maybe crash, maybe fail."""
    record(ctx, "begin")
    crash_point(ctx, "before")
    time.sleep(_work(ctx))
    if reject:
        record(ctx, "reject")
        raise StepRejected(f"{ctx.step} refused")
    record(ctx, "do")
    crash_point(ctx, "after")
    if fail:
        # The remote side acted, then the call failed: outcome unknown, so it is compensated.
        raise RuntimeError(f"{ctx.step}: timed out after acting")


async def aforward(ctx: StepContext, fail_attempt: bool = False) -> None:
    """An async forward step; ``fail_attempt`` fails this attempt before acting."""
    await _bg(record, ctx, "begin")
    await _bg(crash_point, ctx, "before")
    await anyio.sleep(_work(ctx))
    if fail_attempt:
        await _bg(record, ctx, "fail")
        raise RuntimeError(f"{ctx.step}: service unavailable")
    await _bg(record, ctx, "do")
    await _bg(crash_point, ctx, "after")


def backward(ctx: StepContext, fail: bool = False) -> None:
    """A sync compensation in two halves, with crash points before, between and after."""
    record(ctx, "undo_begin")
    crash_point(ctx, "comp_before")
    if fail:
        record(ctx, "undo_fail")
        raise RuntimeError(f"compensation of {ctx.step} is broken")
    time.sleep(_work(ctx) / 2)
    record(ctx, "undo_part")
    crash_point(ctx, "comp_mid")
    time.sleep(_work(ctx) / 2)
    record(ctx, "undo")
    crash_point(ctx, "comp_after")


async def abackward(ctx: StepContext) -> None:
    await _bg(record, ctx, "undo_begin")
    await _bg(crash_point, ctx, "comp_before")
    await anyio.sleep(_work(ctx) / 2)
    await _bg(record, ctx, "undo_part")
    await _bg(crash_point, ctx, "comp_mid")
    await anyio.sleep(_work(ctx) / 2)
    await _bg(record, ctx, "undo")
    await _bg(crash_point, ctx, "comp_after")


#: Short retries for compensations, so a broken one parks its saga in about a second.
COMP_RETRY = RetryPolicy(max_attempts=3, backoff=0.05, max_backoff=0.2)

# --- the sagas -------------------------------------------------------------------------------
# Inputs: {"kind": "ok" | "fail" | "reject" | "badcomp", "work": seconds per step}.


class OrderFlow(DeclarativeSaga):
    """reserve (transactional) -> charge, notify (parallel) -> ship.

    Precedence P: ship -> charge -> reserve, ship -> notify -> reserve. ``fail``: ship acts then
    times out (compensated, ship included); ``reject``: ship refuses (not compensated itself);
    ``badcomp``: like fail, and refund is broken, so release (after refund in P) never runs
    while unship and unnotify do: FAILED (compensation_failed).
    """

    saga_type = "recovery-order"

    @step(transactional=True)
    def reserve(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "begin")
        crash_point(ctx, "before")
        ctx.connection.execute(
            text("INSERT INTO reservations (saga_id, attempt, pid) VALUES (:s, :a, :p)"),
            {"s": ctx.saga_id, "a": ctx.attempt, "p": os.getpid()},
        )
        time.sleep(_work(ctx))
        record(ctx, "do")
        # The row is written in the transaction that will record the step: a crash here must
        # leave neither (the transaction dies with the process).
        crash_point(ctx, "tx_after")
        return {"reservation": f"R-{ctx.saga_id}"}

    @compensate("reserve", retry=COMP_RETRY)
    def release(self, ctx: StepContext) -> None:
        backward(ctx)

    @step(depends_on=["reserve"])
    def charge(self, ctx: StepContext) -> dict[str, Any]:
        forward(ctx)
        return {"charge_id": f"C-{ctx['reservation']}"}

    @compensate("charge", retry=COMP_RETRY)
    def refund(self, ctx: StepContext) -> None:
        backward(ctx, fail=ctx["kind"] == "badcomp")

    @step(depends_on=["reserve"])
    async def notify(self, ctx: StepContext) -> dict[str, Any]:
        await aforward(ctx)
        return {"notified": True}

    @compensate("notify", retry=COMP_RETRY)
    async def unnotify(self, ctx: StepContext) -> None:
        await abackward(ctx)

    @step(depends_on=["charge", "notify"])
    def ship(self, ctx: StepContext) -> dict[str, Any]:
        kind = ctx["kind"]
        forward(ctx, fail=kind in ("fail", "badcomp"), reject=kind == "reject")
        return {"tracking": f"T-{ctx['charge_id']}"}

    @compensate("ship", retry=COMP_RETRY)
    def unship(self, ctx: StepContext) -> None:
        backward(ctx)


class ChainFlow(DeclarativeSaga):
    """a -> b -> c -> d, with an explicit order: undo_b waits for undo_a (overriding b -> a).

    P: a -> b, c -> b, d -> c, d -> b. ``d`` fails its first attempt (retried); ``fail``: it
    keeps failing (compensated); ``badcomp``: and undo_c is broken, so undo_b never runs while
    undo_d and undo_a do: FAILED (compensation_failed).
    """

    saga_type = "recovery-chain"

    @step()
    async def a(self, ctx: StepContext) -> dict[str, Any]:
        await aforward(ctx)
        return {"a": 1}

    @compensate("a", retry=COMP_RETRY)
    async def undo_a(self, ctx: StepContext) -> None:
        await abackward(ctx)

    @step(depends_on=["a"])
    def b(self, ctx: StepContext) -> dict[str, Any]:
        forward(ctx)
        return {"b": ctx["a"] + 1}

    @compensate("b", depends_on=["a"], retry=COMP_RETRY)
    def undo_b(self, ctx: StepContext) -> None:
        backward(ctx)

    @step(depends_on=["b"])
    def c(self, ctx: StepContext) -> dict[str, Any]:
        forward(ctx)
        return {"c": ctx["b"] + 1}

    @compensate("c", retry=COMP_RETRY)
    def undo_c(self, ctx: StepContext) -> None:
        backward(ctx, fail=ctx["kind"] == "badcomp")

    @step(depends_on=["c"], retry=RetryPolicy(max_attempts=3, backoff=0.05))
    async def d(self, ctx: StepContext) -> dict[str, Any]:
        await aforward(ctx, fail_attempt=ctx.attempt == 1 or ctx["kind"] != "ok")
        return {"d": ctx["c"] + 1}

    @compensate("d", retry=COMP_RETRY)
    async def undo_d(self, ctx: StepContext) -> None:
        await abackward(ctx)


async def _hold_async(ctx: StepContext) -> None:
    await _bg(record, ctx, "begin")
    try:
        while ctx.attempt == 1 and not await _bg(gate_open, ctx.saga_id):
            await anyio.sleep(0.05)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await _bg(record, ctx, "cancelled")
        raise
    await _bg(record, ctx, "do")


class PauseAsync(DeclarativeSaga):
    """``hold`` blocks its first attempt until the test opens the saga's gate (async step: a
    worker that loses its lease cancels it)."""

    saga_type = "recovery-pause-async"

    @step()
    async def hold(self, ctx: StepContext) -> dict[str, Any]:
        await _hold_async(ctx)
        return {"held_by": os.getpid()}

    @step(depends_on=["hold"])
    async def after_hold(self, ctx: StepContext) -> dict[str, Any]:
        await _bg(record, ctx, "begin")
        await _bg(record, ctx, "do")
        return {}


class PauseSync(DeclarativeSaga):
    """Like ``PauseAsync`` with sync steps: a worker thread cannot be interrupted, so the
    stalled attempt may still act when released, but its worker must record nothing."""

    saga_type = "recovery-pause-sync"

    @step()
    def hold(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "begin")
        while ctx.attempt == 1 and not gate_open(ctx.saga_id):
            time.sleep(0.05)
        record(ctx, "do")
        return {"held_by": os.getpid()}

    @step(depends_on=["hold"])
    def after_hold(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "begin")
        record(ctx, "do")
        return {}


class PoisonFlow(DeclarativeSaga):
    """``poison`` kills its worker at every attempt when crash tokens say so (a crash loop)."""

    saga_type = "recovery-poison"

    @step()
    def first(self, ctx: StepContext) -> dict[str, Any]:
        forward(ctx)
        return {}

    @compensate("first")
    def undo_first(self, ctx: StepContext) -> None:
        backward(ctx)

    @step(depends_on=["first"])
    def poison(self, ctx: StepContext) -> dict[str, Any]:
        forward(ctx)
        return {}


SAGAS: dict[str, type[DeclarativeSaga]] = {
    cls.saga_type: cls for cls in (OrderFlow, ChainFlow, PauseAsync, PauseSync, PoisonFlow)
}

# --- what each saga must end as --------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """The designed end of one saga."""

    status: str
    reason: str | None = None
    failed_step: str | None = None
    #: the compensation made to fail permanently
    broken: str | None = None


def designed(saga_type: str, kind: str) -> Expect:
    """What a saga of ``saga_type`` started with ``{"kind": kind}`` must end as."""
    last = {"recovery-order": "ship", "recovery-chain": "d"}.get(saga_type)
    if kind == "ok" or last is None:
        return Expect("COMPLETED")
    if kind in ("fail", "reject"):
        return Expect("COMPENSATED", failed_step=last)
    broken = {"recovery-order": "charge", "recovery-chain": "c"}[saga_type]
    return Expect("FAILED", "compensation_failed", failed_step=last, broken=broken)


# --- the checker -----------------------------------------------------------------------------


@dataclass
class Report:
    """What ``verify`` found: problems (empty when every invariant holds) and figures."""

    problems: list[str] = field(default_factory=list)
    figures: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def bad(self, saga_id: str, message: str) -> None:
        self.problems.append(f"saga {saga_id}: {message}")


@dataclass(frozen=True)
class _Effect:
    seq: int
    step: str
    kind: str
    attempt: int
    pid: int
    entry_status: str | None
    entry_attempts: int | None
    entry_owner: str | None


def _owner_pid(owner: str | None) -> int | None:
    parts = (owner or "").split(":")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def verify(
    store_dsn: str,
    effects_dsn: str,
    expected: Mapping[str, Expect],
    *,
    killed: set[int] | None,
    lost: Iterable[str] = (),
) -> Report:
    """Check every saga in ``expected`` against the store, the outbox and the effects.

    ``killed``: pids of workers that died by SIGKILL. When given (strict mode), an effect may
    repeat only if the earlier one's process was killed, and a step must start under its own
    worker's lease; sagas in ``lost`` (a live worker logged "lease lost" for them) are exempt
    from those two rules, since an uninterruptible step thread may still act after losing
    its lease. ``killed=None``: no such rules (at-least-once after an outage).
    """
    report = Report()
    lost = set(lost)
    with psycopg.connect(store_dsn) as sc:
        sagas = {
            r[0]: r
            for r in sc.execute(
                "SELECT id, saga_type, status, reason, failed_step FROM saga_sagas"
            ).fetchall()
        }
        steps: dict[str, dict[str, tuple[Any, ...]]] = defaultdict(dict)
        for r in sc.execute(
            "SELECT saga_id, name, status, outcome, attempts, crashes, compensation_attempts "
            "FROM saga_steps"
        ).fetchall():
            steps[r[0]][r[1]] = r
        events: dict[tuple[str, str], int] = {
            (r[0], r[1]): r[2]
            for r in sc.execute(
                "SELECT saga_id, event_type, count(*) FROM saga_outbox GROUP BY 1, 2"
            ).fetchall()
        }
        rows: dict[str, int] = dict(
            sc.execute("SELECT saga_id, count(*) FROM reservations GROUP BY 1").fetchall()
        )
    effects: dict[tuple[str, str], list[_Effect]] = defaultdict(list)
    with psycopg.connect(effects_dsn) as ec:
        for r in ec.execute(
            "SELECT seq, saga_id, step, kind, attempt, pid, entry_status, entry_attempts, "
            "entry_owner FROM effects ORDER BY seq"
        ).fetchall():
            effects[(r[1], r[2])].append(_Effect(r[0], *r[2:]))

    for saga_id, want in expected.items():
        row = sagas.get(saga_id)
        if row is None:
            report.bad(saga_id, "missing from the store")
            continue
        strict = killed is not None and saga_id not in lost
        _check_saga(
            report, saga_id, row, want, steps[saga_id], events, rows, effects, killed, strict
        )
    return report


def _check_saga(
    report: Report,
    saga_id: str,
    row: tuple[Any, ...],
    want: Expect,
    steps: Mapping[str, tuple[Any, ...]],
    events: Mapping[tuple[str, str], int],
    reservations: Mapping[str, int],
    effects: Mapping[tuple[str, str], list[_Effect]],
    killed: set[int] | None,
    strict: bool,
) -> None:
    _, saga_type, status, reason, failed_step = row
    if (status, reason) != (want.status, want.reason) or failed_step != want.failed_step:
        report.bad(
            saga_id,
            f"ended {status} (reason {reason}, failed step {failed_step}); designed to end "
            f"{want.status} (reason {want.reason}, failed step {want.failed_step})",
        )
    report.figures[f"sagas {want.status}"] += 1
    definition = SAGAS[saga_type].definition()
    graph = definition.graph

    def eff(name: str, kind: str) -> list[_Effect]:
        return [e for e in effects.get((saga_id, name), []) if e.kind == kind]

    def repeats_explained(name: str, kind: str) -> None:
        """Every ``kind`` effect but the last came from a process that was then killed."""
        done = eff(name, kind)
        report.figures[f"'{kind}' effects"] += len(done)
        report.figures[f"'{kind}' effects repeated"] += max(0, len(done) - 1)
        if not strict or killed is None:
            return
        unexplained = [e for e in done[:-1] if e.pid not in killed]
        if unexplained:
            report.bad(
                saga_id,
                f"{name}: '{kind}' happened {len(done)} times, and the earlier run(s) by live "
                f"pid(s) {[e.pid for e in unexplained]} were not killed",
            )

    outcome = {name: steps[name][3] for name in definition.order}
    for name in definition.order:
        _, _, st_status, st_outcome, attempts, _crashes, _ = steps[name]
        sd = definition.step(name)
        begins = eff(name, "begin")
        report.figures["step runs"] += len(begins)
        seen = [e.attempt for e in begins]
        if len(seen) != len(set(seen)):
            report.bad(saga_id, f"{name}: one attempt number ran twice: {seen}")
        for e in begins:
            if e.entry_status not in (None, "RUNNING") or e.entry_attempts not in (None, e.attempt):
                report.bad(
                    saga_id,
                    f"{name}: attempt {e.attempt} (pid {e.pid}) started while the store said "
                    f"{e.entry_status} with {e.entry_attempts} attempts",
                )
            if strict and e.entry_owner is not None and _owner_pid(e.entry_owner) != e.pid:
                report.bad(
                    saga_id,
                    f"{name}: attempt {e.attempt} ran in pid {e.pid} while {e.entry_owner} "
                    "held the lease",
                )
        if begins and attempts < max(seen):
            report.bad(saga_id, f"{name}: ran attempt {max(seen)} but the store has {attempts}")
        completed = events.get((saga_id, sd.event_type), 0)
        dos = eff(name, "do")
        if st_outcome == "succeeded":
            if not dos:
                report.bad(saga_id, f"{name}: recorded succeeded but never acted")
            if completed != 1:
                report.bad(saga_id, f"{name}: succeeded, with {completed} completion events")
            if strict and dos and begins and begins[-1].seq > dos[-1].seq:
                report.bad(
                    saga_id,
                    f"{name}: ran again (attempt {begins[-1].attempt}) after its recorded success",
                )
        elif completed:
            report.bad(saga_id, f"{name}: {st_status}, yet {completed} completion events")
        repeats_explained(name, "do")
        for dep in sd.depends_on:
            dep_dos = eff(dep, "do")
            if begins and dep_dos and begins[0].seq < dep_dos[-1].seq:
                report.bad(saga_id, f"{name} started before its dependency {dep} finished")
        if sd.transactional:
            want_rows = 1 if st_outcome == "succeeded" else 0
            got = reservations.get(saga_id, 0)
            if got != want_rows:
                report.bad(
                    saga_id,
                    f"{name}: {got} rows written by the transactional step, not {want_rows}",
                )
            report.figures["transactional rows"] += got
        if status == "COMPLETED" and st_status != "SUCCEEDED":
            report.bad(saga_id, f"COMPLETED with step {name} {st_status}")

    if status == "COMPLETED" or (status == "FAILED" and reason != "compensation_failed"):
        # Not compensated: completed, or parked going forward (crash_loop, forward_stuck).
        if any(eff(s, "undo_begin") for s in graph.steps):
            report.bad(saga_id, f"{status} ({reason}), yet some compensation ran")
        return
    affected = [
        s
        for s in graph.steps
        if s in graph.compensatable and outcome[s] in ("succeeded", "unknown")
    ]
    failed_comps = {s for s in affected if steps[s][2] == "COMPENSATION_FAILED"}
    for name in graph.steps:
        if name not in graph.compensatable:
            continue
        st_status = steps[name][2]
        comp = definition.step(name).compensation
        assert comp is not None
        undo_begins = eff(name, "undo_begin")
        undos = eff(name, "undo")
        compensated = events.get((saga_id, comp.event_type), 0)
        if name not in affected:
            if undo_begins or st_status == "COMPENSATED" or compensated:
                report.bad(saga_id, f"{name} ({outcome[name]}) was compensated; nothing to undo")
            continue
        report.figures["compensation runs"] += len(undo_begins)
        for e in undo_begins:
            if e.entry_status not in (None, "COMPENSATING") or e.entry_attempts not in (
                None,
                e.attempt,
            ):
                report.bad(
                    saga_id,
                    f"compensation of {name}, attempt {e.attempt}, started while the store "
                    f"said {e.entry_status} with {e.entry_attempts} attempts",
                )
        if st_status == "COMPENSATED":
            if not undos:
                report.bad(saga_id, f"{name}: recorded COMPENSATED, but its undo never happened")
            if compensated != 1:
                report.bad(saga_id, f"{name}: compensated, with {compensated} compensation events")
            if strict and undos and undo_begins[-1].seq > undos[-1].seq:
                report.bad(saga_id, f"{name}: compensation ran again after it was recorded done")
            repeats_explained(name, "undo")
        elif st_status == "COMPENSATION_FAILED":
            if name != want.broken:
                report.bad(saga_id, f"compensation of {name} failed; only {want.broken} may")
            if undos or compensated:
                report.bad(saga_id, f"{name}: compensation failed, yet it undid or was recorded")
        else:
            blockers = [f for f in failed_comps if (f, name) in graph.precedence]
            if not blockers:
                report.bad(saga_id, f"{name} was left {st_status}: never compensated")
            if undo_begins:
                report.bad(saga_id, f"{name}: compensation started though {blockers} failed")
        # Order: comp(t) finished (its last undo) before comp(s) started (its first start).
        for t in affected:
            if (t, name) not in graph.precedence or not undo_begins:
                continue
            t_undos = eff(t, "undo")
            if steps[t][2] != "COMPENSATED" or not t_undos:
                report.bad(saga_id, f"compensation of {name} started before {t} was compensated")
            elif t_undos[-1].seq > undo_begins[0].seq:
                report.bad(
                    saga_id,
                    f"compensation of {name} started (#{undo_begins[0].seq}) before that of "
                    f"{t} finished (#{t_undos[-1].seq}); P requires {t} first",
                )
            else:
                report.figures["precedence edges checked"] += 1


# --- starting sagas and running workers -------------------------------------------------------


def start_sagas(
    url: str, sagas: Iterable[tuple[str, type[DeclarativeSaga], dict[str, Any]]]
) -> None:
    """Enqueue ``(saga_id, class, input)`` sagas as PENDING (an orchestrator that is not open
    only enqueues), for the worker processes to claim."""
    from saga_core import SagaOrchestrator
    from saga_storage import create_storage

    async def start_all() -> None:
        orchestrator = SagaOrchestrator(storage)
        for saga_id, cls, data in sagas:
            await orchestrator.start(cls, context=data, saga_id=saga_id)

    storage = create_storage(url)
    try:
        anyio.run(start_all)
    finally:
        storage.dispose()


def main(argv: list[str] | None = None) -> int:
    from saga_storage import create_storage

    parser = argparse.ArgumentParser(prog="python -m tests.recovery.app")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run a SagaWorker for the recovery sagas until SIGTERM")
    w.add_argument("--store", required=True, help="SQLAlchemy URL of the saga store")
    w.add_argument("--effects", required=True, help="libpq URI of the effects database")
    w.add_argument("--concurrency", type=int, default=4)
    w.add_argument("--lease", type=float, default=1.0)
    w.add_argument("--poll", type=float, default=0.25)
    w.add_argument("--max-crashes", type=int, default=1000)
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    configure(store_url=args.store, effects_dsn=args.effects)
    storage = create_storage(args.store)
    worker = SagaWorker(
        storage,
        sagas=SAGAS.values(),
        concurrency=args.concurrency,
        lease_seconds=args.lease,
        poll_interval=args.poll,
        max_crashes=args.max_crashes,
        shutdown_grace=2.0,
        relay=False,
    )

    async def serve() -> None:
        # Printed where SIGTERM is handled gracefully from (the harness waits for this line).
        print(f"worker {worker.owner} started (pid {os.getpid()})", flush=True)
        await worker.run_until_signalled()

    try:
        anyio.run(serve)
    finally:
        storage.dispose()
        for pool in (CONFIG.effects, CONFIG.store):
            if pool is not None:
                pool.close()
    print(f"worker {worker.owner} stopped", flush=True)
    return 0


if __name__ == "__main__":
    # Run through the package module, so the saga classes are defined once, under their name.
    from tests.recovery.app import main as _main

    raise SystemExit(_main())
