"""Lease renewals shared by the runs of an event loop (saga_core._leases), on real storage.

Every call of ``renew_leases`` is recorded by wrapping the storage's method; the renewal
statements themselves are counted with a SQLAlchemy cursor event on every engine (on PostgreSQL
renewals go through a dedicated engine, created on first use).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from sqlalchemy import create_engine, event, update
from sqlalchemy.engine import Engine

from saga_core import (
    DeclarativeSaga,
    SagaOrchestrator,
    SagaStatus,
    SagaWorker,
    StepContext,
    StepRejected,
    _leases,
    compensate,
    step,
)
from saga_core._leases import LeaseKeeper
from saga_core.errors import SagaFailed, StorageError
from saga_core.records import Fence, NewSaga
from saga_storage import SqlStorage, create_storage
from tests.engine.sagas import LOG, record
from tests.support.threads import run_threads

pytestmark = pytest.mark.anyio

#: When each saga's step saw itself cancelled (the run stopped acting), monotonic clock.
STOPPED: dict[str, float] = {}

#: The wrapper reads the clock a few microseconds after the keeper does when a call starts (and
#: before it does when a call ends): comparisons between the two allow this much.
SKEW = 0.002

#: The lease of the tests that must keep theirs. A renewal must answer within 5/12 of the lease
#: (a third of it after it was due, less the quarter trust keeps back): at 0.6 s that is 0.25 s,
#: which a loaded CI machine running two test processes missed (and the run stopped, rightly),
#: as a fresh machine's disk once did. Tests of refused or hung renewals use it too.
LEASE = 1.2


def _sid() -> str:
    return f"l-{uuid.uuid4().hex[:10]}"


class _Sleeper(DeclarativeSaga):
    """One step, as long as the saga asks: longer than its trust, its run must renew to finish."""

    saga_type = "test-leases-sleeper"

    @step()
    async def slow(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "start")
        try:
            await anyio.sleep(ctx["seconds"])
        except anyio.get_cancelled_exc_class():
            STOPPED[ctx.saga_id] = time.monotonic()
            raise
        record(ctx, "do")
        return {"slept": ctx["seconds"]}


class _SlowUndo(DeclarativeSaga):
    """``book`` succeeds, ``fail`` fails at once; undoing ``book`` outlasts several leases."""

    saga_type = "test-leases-slow-undo"

    @step()
    async def book(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        return {}

    @compensate("book")
    async def unbook(self, ctx: StepContext) -> None:
        record(ctx, "undo-start")
        await anyio.sleep(ctx["undo_seconds"])
        record(ctx, "undo")

    @step(depends_on=["book"])
    async def fail(self, ctx: StepContext) -> dict[str, Any]:
        raise StepRejected("refused")


@dataclass
class _Call:
    owner: str
    lease_seconds: float
    ids: list[str]
    started: float
    ended: float | None = None
    held: set[str] | None = None  # None: refused or still running


class _Renewals:
    """Records every ``renew_leases`` call of one storage; can refuse them (fault injection)."""

    def __init__(self, storage: SqlStorage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[_Call] = []
        self.refuse = False
        #: What a refused call raises.
        self.refusal: Exception = StorageError("renewal refused (injected)")
        #: Runs inside the call, before the database is asked (in the caller's task).
        self.hook: Callable[[_Call], Awaitable[None]] | None = None
        self._real = storage.renew_leases
        monkeypatch.setattr(storage, "renew_leases", self._renew)

    async def _renew(self, owner: str, fences: Sequence[Fence], lease_seconds: float) -> set[str]:
        call = _Call(owner, lease_seconds, [f.saga_id for f in fences], time.monotonic())
        self.calls.append(call)
        if self.hook is not None:
            await self.hook(call)
        if self.refuse:
            call.ended = time.monotonic()
            raise self.refusal
        held = await self._real(owner, fences, lease_seconds)
        call.ended, call.held = time.monotonic(), held
        return held

    def trusted_until(self, saga_id: str, lease_seconds: float) -> float | None:
        """When the saga's run may stop trusting its lease: start of its last successful
        renewal plus three quarters of the lease (None if never renewed)."""
        starts = [c.started for c in self.calls if c.held is not None and saga_id in c.held]
        return max(starts) + lease_seconds * 3 / 4 if starts else None


@pytest.fixture
def renewal_statements() -> Iterator[list[str]]:
    """Every lease renewal statement executed on any engine (the only UPDATE that sets just
    ``lease_until``; claims, writes and releases set more)."""
    seen: list[str] = []

    def count(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if statement.startswith("UPDATE") and " SET lease_until=" in statement:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", count)


async def keep_lease(storage: SqlStorage, fence: Fence, lease_seconds: float) -> None:
    """Hold ``fence``'s lease with this loop's renewals, as a run does; returns once the lease
    is lost (runs until cancelled otherwise, and unregisters then)."""
    lost = anyio.Event()
    keeper = LeaseKeeper(storage, fence, lease_seconds, on_lost=lost.set)
    keeper.start()
    try:
        await lost.wait()
    finally:
        keeper.stop()


async def _leased(storage: SqlStorage, owner: str, lease_seconds: float) -> Fence:
    d = _Sleeper.definition()
    _, fence = await storage.create_saga(
        NewSaga(_sid(), d.saga_type, d.version, {"seconds": 0}, d.step_names),
        lease_owner=owner,
        lease_seconds=lease_seconds,
    )
    assert fence is not None
    return fence


async def test_many_sagas_share_few_renewal_statements(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch, renewal_statements: list[str]
) -> None:
    """Sagas started at different moments, by two owners with different lease lengths, each
    running a step of several leases: none loses its lease (a rival worker would take any that
    expired), each owner's renewals go out in shared calls, and owners and lengths never mix."""
    renewals = _Renewals(storage, monkeypatch)
    leases = {"a": LEASE, "b": 1.5 * LEASE}
    counts = {"a": 30, "b": 20}
    orchs = {o: SagaOrchestrator(storage, owner=o, lease_seconds=s) for o, s in leases.items()}
    seconds = 2.5 * LEASE  # 2.5 leases of "a", 7.5 renewal periods
    rival = SagaWorker(storage, sagas=[_Sleeper], owner="rival", poll_interval=0.05)
    owner_of: dict[str, str] = {}
    results: dict[str, Any] = {}

    async def one(owner: str) -> None:
        sid = _sid()
        owner_of[sid] = owner
        results[sid] = await orchs[owner].execute(_Sleeper(), {"seconds": seconds}, saga_id=sid)

    began = time.monotonic()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(rival.run)
            async with anyio.create_task_group() as sagas:
                for i in range(max(counts.values())):
                    for owner, n in counts.items():
                        if i < n:
                            sagas.start_soon(one, owner)
                    await anyio.sleep(LEASE * 2 / 3 / max(counts.values()))  # over 8+ grid cells
            rival.stop()
    elapsed = time.monotonic() - began

    assert len(results) == sum(counts.values())
    for sid, result in results.items():
        assert result["slept"] == seconds
        state = await storage.load_saga(sid)
        assert state.status == SagaStatus.COMPLETED
        assert state.lease_epoch == 1  # never taken over
        assert [k for k, s, _ in LOG[sid] if s == "slow"] == ["start", "do"]
    assert not STOPPED.keys() & results.keys()

    calls = renewals.calls
    for n, c in enumerate(calls):  # one owner and one lease length per call
        assert {owner_of[i] for i in c.ids} == {c.owner}
        assert c.lease_seconds == leases[c.owner]
        # Nothing lost. A saga may be missing only if its run had just released the lease
        # (its final write commits a moment before the run unregisters): never again then.
        assert c.held is not None
        for sid in set(c.ids) - c.held:
            assert all(sid not in later.ids for later in calls[n + 1 :])
    assert len(renewal_statements) == len(calls)  # one statement per call
    # Calls of one group start at least a grid cell (lease / 12) apart.
    for owner, lease in leases.items():
        mine = [c for c in calls if c.owner == owner]
        assert len(mine) <= elapsed / (lease / 12) + 1
    # What a keeper per saga would have needed: one statement per saga and renewal.
    per_saga = sum(len(c.ids) for c in calls)
    print(f"renewal statements: {len(calls)} for {per_saga} saga renewals")
    assert per_saga >= sum(counts.values())  # every saga was renewed
    assert len(calls) * 4 <= per_saga


async def test_a_stolen_lease_stops_only_that_run(storage: SqlStorage) -> None:
    """One saga taken over by another owner, one re-claimed under a new epoch: exactly those
    runs stop, write nothing more and cancel their step; the others finish."""
    orch = SagaOrchestrator(storage)
    ids = [await orch.start(_Sleeper(), {"seconds": 1.5}, saga_id=_sid()) for _ in range(6)]
    worker = SagaWorker(storage, sagas=[_Sleeper], owner="a", lease_seconds=LEASE)
    stolen, bumped, others = ids[0], ids[1], ids[2:]
    sagas = storage.tables.sagas
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run_once)
            while not all(("start", "slow", None) in LOG[s] for s in ids):
                await anyio.sleep(0.01)
            with storage.engine.begin() as conn:
                conn.execute(
                    update(sagas)
                    .where(sagas.c.id == stolen)
                    .values(lease_owner="thief", lease_epoch=sagas.c.lease_epoch + 1)
                )
                conn.execute(
                    update(sagas)
                    .where(sagas.c.id == bumped)
                    .values(lease_epoch=sagas.c.lease_epoch + 1)
                )
            before = {s: await storage.load_saga(s) for s in (stolen, bumped)}
    for sid in (stolen, bumped):
        after = await storage.load_saga(sid)
        assert after.status == SagaStatus.RUNNING
        assert after.lease_epoch == 2
        assert after.steps == before[sid].steps  # the run wrote nothing more
        assert sid in STOPPED  # its step was cancelled
        assert "do" not in [k for k, _, _ in LOG[sid]]
    assert (await storage.load_saga(stolen)).lease_owner == "thief"
    for sid in others:
        state = await storage.load_saga(sid)
        assert state.status == SagaStatus.COMPLETED
        assert state.lease_epoch == 1
        assert sid not in STOPPED


async def test_refused_renewals_stop_runs_when_trust_ends_not_before(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the database refuses renewals, runs go on until their lease can no longer be
    trusted (start of the last successful renewal including them + lease - lease / 4), then
    stop: not on the first refusal, not before, and not much after."""
    lease = LEASE
    renewals = _Renewals(storage, monkeypatch)
    orch = SagaOrchestrator(storage)
    ids = [await orch.start(_Sleeper(), {"seconds": 5.0}, saga_id=_sid()) for _ in range(5)]
    worker = SagaWorker(storage, sagas=[_Sleeper], owner="a", lease_seconds=lease)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run_once)
            # Refuse from the moment every run was renewed at least once.
            while not all(renewals.trusted_until(s, lease) for s in ids):
                await anyio.sleep(0.005)
            renewals.refuse = True
    refused = [c for c in renewals.calls if c.held is None]
    for sid in ids:
        trusted_until = renewals.trusted_until(sid, lease)
        assert trusted_until is not None
        assert STOPPED[sid] >= trusted_until - SKEW  # not before
        # It was refused before its trust ended and went on; it stopped when trust ended,
        # without waiting for a further call.
        mine = [c for c in refused if sid in c.ids]
        assert any(c.started < trusted_until for c in mine)
        assert len(mine) <= 4  # retried, not hammered (a period apart, one last chance)
        # Within a renewal period (0.4 s) of it: stopped by trust ending, not by a later call
        # (the slack is for a loaded machine's scheduling: two test processes share 2 cores).
        assert STOPPED[sid] < trusted_until + lease / 3
        assert "do" not in [k for k, _, _ in LOG[sid]]
        assert (await storage.load_saga(sid)).status == SagaStatus.RUNNING


async def test_leases_taken_or_released_stop_only_their_holders(storage: SqlStorage) -> None:
    """A renewal that finds one saga released, one re-claimed and one taken by another owner
    stops exactly those three holders; the others stay renewed in the same calls."""
    lease = LEASE
    fences = [await _leased(storage, "o", lease) for _ in range(6)]
    ended: dict[str, float] = {}
    sagas = storage.tables.sagas

    async def hold(fence: Fence) -> None:
        await keep_lease(storage, fence, lease)
        ended[fence.saga_id] = time.monotonic()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for f in fences:
                tg.start_soon(hold, f)
            await anyio.sleep(0.1)
            await storage.release(fences[0])
            with storage.engine.begin() as conn:
                conn.execute(
                    update(sagas)
                    .where(sagas.c.id == fences[1].saga_id)
                    .values(lease_epoch=sagas.c.lease_epoch + 1)
                )
                conn.execute(
                    update(sagas)
                    .where(sagas.c.id == fences[2].saga_id)
                    .values(lease_owner="thief", lease_epoch=sagas.c.lease_epoch + 1)
                )
            while len(ended) < 3:
                await anyio.sleep(0.01)
            await anyio.sleep(3 * lease)  # the others keep renewing
            tg.cancel_scope.cancel()
    assert set(ended) == {f.saga_id for f in fences[:3]}
    for f in fences[3:]:
        state = await storage.load_saga(f.saga_id)
        assert state.lease_owner == "o"
        assert state.lease_epoch == f.epoch


async def test_an_older_run_of_a_saga_is_not_renewed_by_the_newer_one(
    storage: SqlStorage,
) -> None:
    """A run of a saga this owner has since claimed again (a newer epoch, another run here):
    the answer of a renewal names sagas, not epochs, so the older run must learn it lost the
    lease even when both are due together, and the newer one keeps it."""
    lease = LEASE
    old = await _leased(storage, "o", lease)
    sagas = storage.tables.sagas
    with storage.engine.begin() as conn:
        conn.execute(
            update(sagas).where(sagas.c.id == old.saga_id).values(lease_epoch=old.epoch + 1)
        )
    new = Fence(old.saga_id, "o", old.epoch + 1)
    ended: list[Fence] = []

    async def hold(fence: Fence) -> None:
        await keep_lease(storage, fence, lease)
        ended.append(fence)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, old)
            tg.start_soon(hold, new)  # registered together: due in the same grid cell
            await anyio.sleep(3 * lease)
            tg.cancel_scope.cancel()
    assert ended == [old]


async def test_a_run_cancelled_during_a_renewal_leaves_the_others_renewed(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run is cancelled while a renewal including it is in flight: the call still completes
    for everyone in it, the others go on renewing, and the cancelled run's lease is never
    renewed again. (Renewals run in the loop's lease driver, a task of no run.)"""
    lease = LEASE
    renewals = _Renewals(storage, monkeypatch)
    fences = [await _leased(storage, "o", lease) for _ in range(5)]
    scopes: dict[str, anyio.CancelScope] = {}
    ended: list[str] = []
    victim: list[str] = []
    driver_tasks: set[int] = set()

    async def hold(fence: Fence) -> None:
        with anyio.CancelScope() as scopes[fence.saga_id]:
            await keep_lease(storage, fence, lease)
            ended.append(fence.saga_id)

    async def cancel_one(call: _Call) -> None:
        driver_tasks.add(anyio.get_current_task().id)
        if victim:
            return
        victim.append(call.ids[0])
        scopes[victim[0]].cancel()
        await anyio.sleep(0.05)  # the cancellation is delivered during the call

    renewals.hook = cancel_one
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for f in fences:
                tg.start_soon(hold, f)
            while not victim:
                await anyio.sleep(0.01)
            await anyio.sleep(3 * lease)
            tg.cancel_scope.cancel()
    first, later = renewals.calls[0], renewals.calls[1:]
    assert first.held == {f.saga_id for f in fences}  # completed for all, victim included
    assert later
    assert all(victim[0] not in c.ids for c in later)  # unregistered
    for f in fences:
        if f.saga_id != victim[0]:
            assert any(c.held and f.saga_id in c.held for c in later)
    assert not ended  # nobody lost a lease
    assert len(driver_tasks) == 1  # one driver made every call


async def test_a_stopped_keeper_leaves_at_once_and_is_not_renewed_again(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that ends stops its keeper (no task to cancel: a cancelled task leaves a
    reference cycle for the garbage collector): it leaves its group at once, long before the
    next renewal, and the stopped lease is never renewed again while the others are. A keeper
    stopped before it started never joins."""
    lease = LEASE
    renewals = _Renewals(storage, monkeypatch)
    fences = [await _leased(storage, "o", lease) for _ in range(3)]
    lost: list[int] = []
    keepers = [
        LeaseKeeper(storage, f, lease, on_lost=functools.partial(lost.append, i))
        for i, f in enumerate(fences)
    ]
    keepers[2].stop()  # before it starts
    for k in keepers:
        k.start()
    group = keepers[0]._group
    assert group is not None and keepers[2]._group is None
    with anyio.fail_after(30):
        await anyio.sleep(0.05)
        keepers[0].stop()
        assert keepers[0]._member not in group.members  # at once, not at a renewal
        await anyio.sleep(3 * lease)  # keeper 1 renews meanwhile
        keepers[1].stop()
    assert renewals.calls
    assert all(
        fences[0].saga_id not in c.ids and fences[2].saga_id not in c.ids for c in renewals.calls
    )
    assert sum(fences[1].saga_id in (c.held or ()) for c in renewals.calls) >= 2
    assert not lost


async def test_a_run_that_ends_during_a_renewal_is_not_told_it_lost_its_lease(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that lets its lease go (it finished, or suspended itself) and stops its keeper
    while a renewal including it is in flight: the renewal no longer finds the saga held,
    which is no news to a stopped run, so it is not told it lost its lease."""
    # Twice the usual lease: the hook's release must end before trust does (at 1.2 s, a
    # loaded CI run's release outlived the 0.5 s left, and the run was rightly stopped).
    lease = 2 * LEASE
    renewals = _Renewals(storage, monkeypatch)
    fence = await _leased(storage, "o", lease)
    lost: list[bool] = []
    keeper = LeaseKeeper(storage, fence, lease, on_lost=functools.partial(lost.append, True))

    async def end_the_run(call: _Call) -> None:
        await storage.release(fence)  # the run's last write let the lease go
        keeper.stop()

    renewals.hook = end_the_run
    keeper.start()
    with anyio.fail_after(30):
        # The driver's call outlives the stopped keeper: let it end, then look.
        while not renewals.calls or renewals.calls[0].ended is None:
            await anyio.sleep(0.005)
        await anyio.sleep(0.01)
    assert renewals.calls[0].held == set()  # the call did not find it
    assert not lost
    assert not keeper.lost


async def test_a_large_batch_is_split_into_bounded_statements(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More fences due at once than one statement may carry go out in several calls of one
    leader; every lease stays held."""
    # Longer than the other tests' lease: three calls in a row must each answer within the
    # lease's trust, which a loaded machine (the other test worker starting brokers) broke.
    lease = 2.5 * LEASE
    monkeypatch.setattr(_leases, "MAX_FENCES", 2)
    renewals = _Renewals(storage, monkeypatch)
    fences = [await _leased(storage, "o", lease) for _ in range(5)]
    ended: list[str] = []

    async def hold(fence: Fence) -> None:
        await keep_lease(storage, fence, lease)
        ended.append(fence.saga_id)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for f in fences:
                tg.start_soon(hold, f)
            await anyio.sleep(2 * lease)
            tg.cancel_scope.cancel()
        # The driver's call may outlive the cancelled keepers: let it end, then look.
        while renewals.calls[-1].ended is None:
            await anyio.sleep(0.005)
    assert renewals.calls
    assert all(len(c.ids) <= 2 for c in renewals.calls)
    for c in renewals.calls:
        assert c.held == set(c.ids)
    for f in fences:
        assert any(f.saga_id in c.ids for c in renewals.calls)
    assert not ended


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_event_loops_in_other_threads_keep_their_own_renewals(
    storage: SqlStorage, backend: str
) -> None:
    """Per-loop state: sagas run by two event loops at once (as the sync facade's loop thread
    next to an application's loop) each keep their short lease."""
    results: dict[str, Any] = {}

    def run_one(_: int) -> None:
        async def main() -> None:
            sid = _sid()
            orch = SagaOrchestrator(storage, lease_seconds=LEASE)
            results[sid] = await orch.execute(_Sleeper(), {"seconds": 1.5 * LEASE}, saga_id=sid)

        anyio.run(main, backend=backend)

    assert run_threads(run_one, 2) == []
    assert len(results) == 2
    for sid in results:
        assert results[sid]["slept"] == 1.5 * LEASE
        assert anyio.run(storage.load_saga, sid).lease_epoch == 1


def test_a_renewal_locks_its_sagas_in_id_order(pg_url: str) -> None:
    """A renewal of many sagas must lock their rows in id order, as a coalesced batch of writes
    does: locking in heap order, it would hold a row the batch wants next while it waits for
    one the batch holds (a deadlock, detected only after a second)."""
    storage = create_storage(pg_url)
    try:
        d = _Sleeper.definition()

        async def create(sid: str) -> Fence:
            new = NewSaga(sid, d.saga_type, d.version, {"seconds": 0}, d.step_names)
            _, fence = await storage.create_saga(new, lease_owner="o", lease_seconds=30)
            assert fence is not None
            return fence

        # Heap order b, a; id order a, b.
        fb = anyio.run(create, "order-b")
        fa = anyio.run(create, "order-a")
        sagas = storage.tables.sagas
        renewed: list[set[str]] = []
        with storage.engine.connect() as writer:
            # A batch of writes, in id order, has locked a and not yet b.
            bump = update(sagas).values(version=sagas.c.version + 1)
            writer.execute(bump.where(sagas.c.id == fa.saga_id))
            renewal = threading.Thread(
                target=lambda: renewed.append(anyio.run(storage.renew_leases, "o", [fa, fb], 30.0))
            )
            renewal.start()
            time.sleep(0.3)  # the renewal waits for a (and, in id order, holds nothing)
            writer.execute(bump.where(sagas.c.id == fb.saga_id))
            writer.commit()
            renewal.join(10)
        assert renewed == [{fa.saga_id, fb.saga_id}]
    finally:
        storage.dispose()


def test_renewals_starting_at_once_share_one_lease_connection(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first renewals of several lease groups (owners, lease lengths) may come at once,
    each in a thread: they must create one renewal engine between them, which ``dispose``
    closes (another would be left to the garbage collector)."""
    from saga_storage import postgres

    made: list[Engine] = []
    real_make = postgres.make_postgres_engine

    def make(*args: Any, **kwargs: Any) -> Engine:
        time.sleep(0.05)  # as slow as a loaded machine may be, so the calls overlap
        made.append(real_make(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(postgres, "make_postgres_engine", make)
    storage = create_storage(pg_url)
    made.clear()  # the storage's own engine
    engines: list[int] = []
    try:

        def renew(i: int) -> None:
            with storage._lease_write() as conn:
                engines.append(id(conn.engine))
                time.sleep(0.05)  # overlap with the others

        assert run_threads(renew, 8) == []
        assert len(engines) == 8
        assert len(made) == 1 and set(engines) == {id(made[0])}
    finally:
        storage.dispose()


def test_dispose_waits_for_a_renewal_in_flight_in_its_thread(pg_url: str) -> None:
    """``dispose`` (the sync close, as a test fixture or an app's shutdown calls it) while a
    renewal call runs in a worker thread: it waits for the call, then closes its connection.
    Disposed under it, the connection would be dropped open, closed only by the garbage
    collector, with a ResourceWarning, in whatever code runs then."""
    storage = create_storage(pg_url)
    d = _Sleeper.definition()

    async def create() -> Fence:
        new = NewSaga("held-row", d.saga_type, d.version, {"seconds": 0}, d.step_names)
        _, fence = await storage.create_saga(new, lease_owner="o", lease_seconds=30)
        assert fence is not None
        return fence

    fence = anyio.run(create)
    sagas = storage.tables.sagas
    other = create_engine(pg_url)  # not the storage's: its pool is the one disposed
    blocker = other.connect()
    blocker.execute(update(sagas).where(sagas.c.id == fence.saga_id).values(note="held"))
    renewed: list[set[str]] = []
    renewal = threading.Thread(
        target=lambda: renewed.append(anyio.run(storage.renew_leases, "o", [fence], 30.0))
    )
    renewal.start()
    time.sleep(0.3)  # the renewal now waits for the row, its connection checked out
    released: list[float] = []

    def release() -> None:
        time.sleep(0.3)
        released.append(time.monotonic())
        blocker.commit()
        blocker.close()

    releaser = threading.Thread(target=release)
    releaser.start()
    storage.dispose()
    disposed = time.monotonic()
    renewal.join(10)
    releaser.join(10)
    assert released and released[0] <= disposed  # dispose waited for the call
    assert renewed == [{fence.saga_id}]
    lease_engine = storage._lease_engine
    assert lease_engine is not None
    assert lease_engine.pool.checkedout() == 0
    storage.dispose()
    other.dispose()


async def test_a_cancelled_caller_keeps_the_lease_renewed_through_shielded_compensation(
    storage: SqlStorage,
) -> None:
    """The caller of ``execute`` is cancelled while its saga compensates: compensation is
    shielded and goes on, so its lease must stay renewed until it ends. A rival worker polls
    all along: with the lease left to expire it would take the saga over (a new epoch) and
    undo ``book`` a second time."""
    lease = LEASE
    orch = SagaOrchestrator(storage, owner="a", lease_seconds=lease)
    rival = SagaWorker(storage, sagas=[_SlowUndo], owner="rival", poll_interval=0.05)
    sid = _sid()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(rival.run)
            with anyio.CancelScope() as caller:

                async def cancel_when_undoing() -> None:
                    while not any(k == "undo-start" for k, _, _ in LOG[sid]):
                        await anyio.sleep(0.005)
                    caller.cancel()

                tg.start_soon(cancel_when_undoing)
                # The shielded compensation ends the run: the caller may see its end
                # (SagaFailed) before its cancellation is delivered.
                with contextlib.suppress(SagaFailed):
                    await orch.execute(_SlowUndo(), {"undo_seconds": 3 * lease}, saga_id=sid)
            assert caller.cancel_called
            state = await storage.load_saga(sid)
            rival.stop()
    assert state.status == SagaStatus.COMPENSATED
    assert state.lease_epoch == 1  # never taken over
    assert [k for k, s, _ in LOG[sid] if s == "book"] == ["do", "undo-start", "undo"]


async def test_the_driver_exits_when_no_run_is_left_and_a_new_run_starts_another(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs own no task: one driver per group renews them. When the last run stops, the driver
    ends and the group is forgotten (nothing is left running in the loop); a run registering
    afterwards gets a new driver and is renewed."""
    lease = LEASE
    renewals = _Renewals(storage, monkeypatch)
    fences = [await _leased(storage, "o", lease) for _ in range(3)]
    keepers = [LeaseKeeper(storage, f, lease) for f in fences]
    for k in keepers:
        k.start()
    await anyio.sleep(lease / 2)  # at least one renewal
    for k in keepers:
        k.stop()
    with anyio.fail_after(5):  # a call in flight when they stopped ends first
        while _leases._groups.get():
            await anyio.sleep(0.01)
    calls = len(renewals.calls)
    assert calls >= 1
    assert _leases._groups.get() == {}  # the driver ended and forgot its group
    await anyio.sleep(lease)
    assert len(renewals.calls) == calls  # nobody renews stopped runs

    again = LeaseKeeper(storage, await _leased(storage, "o", lease), lease)
    again.start()
    try:
        with anyio.fail_after(5):
            while len(renewals.calls) == calls or renewals.calls[-1].ended is None:
                await anyio.sleep(0.01)
    finally:
        again.stop()
    assert renewals.calls[-1].held == {again._member.fence.saga_id}
    assert not again.lost


async def test_an_unexpected_renewal_error_is_retried_like_a_refusal(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal failing with something other than ``StorageError`` (a pool timeout, say)
    proves nothing about the leases: the runs keep them while they can trust them, and the
    next renewal renews them.

    The retry after the failure must answer within a grid cell (lease / 12) before trust ends,
    so the lease is twice the usual one and the renewal engine is connected beforehand: a cold
    first connection on a loaded machine once took longer than 0.1 s, and the runs stopped."""
    lease = 2 * LEASE
    renewals = _Renewals(storage, monkeypatch)
    renewals.refusal = RuntimeError("pool timeout (injected)")
    fences = [await _leased(storage, "o", lease) for _ in range(3)]
    assert await renewals._real("o", fences, lease) == {f.saga_id for f in fences}  # warm-up
    keepers = [LeaseKeeper(storage, f, lease) for f in fences]
    renewals.refuse = True
    for k in keepers:
        k.start()
    try:
        with anyio.fail_after(10):
            while not renewals.calls:
                await anyio.sleep(0.005)
            renewals.refuse = False
            while not any(c.held for c in renewals.calls):
                await anyio.sleep(0.005)
    finally:
        for k in keepers:
            k.stop()
    assert renewals.calls[0].held is None  # the first call failed
    assert renewals.calls[-1].held == {f.saga_id for f in fences}
    assert not any(k.lost for k in keepers)


async def test_a_driver_that_cannot_start_fails_the_run_and_leaves_nothing_behind(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting the renewal driver fails (as trio refuses system tasks while shutting down):
    ``execute`` raises that error at once instead of hanging, the group keeps no member and no
    phantom driver, and the next saga runs normally."""

    def refuse(fn: Any) -> object:
        fn().close()  # the coroutine was made: close it unawaited
        raise RuntimeError("system nursery is closed (injected)")

    orch = SagaOrchestrator(storage, lease_seconds=LEASE)
    monkeypatch.setattr(_leases, "_spawn_system_task", refuse)
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="system nursery"):
        await orch.execute(_Sleeper(), {"seconds": 0}, saga_id=_sid())
    for group in _leases._groups.get().values():
        assert not group.members
        assert group._driver is None
    monkeypatch.undo()
    result = await orch.execute(_Sleeper(), {"seconds": LEASE}, saga_id=_sid())  # renews
    assert result["slept"] == LEASE


async def test_a_renewal_that_does_not_answer_stops_runs_when_trust_ends(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal call hangs (a connection gone silent): it must not stretch trust. Every run
    stops once its trust ends (start of its last successful renewal + lease - lease / 4), not
    before, and long before the call would have returned."""
    lease = LEASE
    hang = 20.0
    renewals = _Renewals(storage, monkeypatch)
    hanging = [False]

    async def hang_once(call: _Call) -> None:
        if hanging[0]:
            hanging[0] = False
            with anyio.CancelScope() as scope:
                hung.append(scope)
                await anyio.sleep(hang)

    hung: list[anyio.CancelScope] = []
    renewals.hook = hang_once
    orch = SagaOrchestrator(storage)
    ids = [await orch.start(_Sleeper(), {"seconds": 5.0}, saga_id=_sid()) for _ in range(4)]
    worker = SagaWorker(storage, sagas=[_Sleeper], owner="a", lease_seconds=lease)
    began = time.monotonic()
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run_once)
            while not all(renewals.trusted_until(s, lease) for s in ids):
                await anyio.sleep(0.005)
            hanging[0] = True  # the next call hangs
            while not all(s in STOPPED for s in ids):
                await anyio.sleep(0.01)
        for scope in hung:
            scope.cancel()  # let the hung call end (the test is over)
    assert hung  # a call did hang
    for sid in ids:
        trusted_until = renewals.trusted_until(sid, lease)
        assert trusted_until is not None
        assert trusted_until - SKEW <= STOPPED[sid] < trusted_until + 0.5  # not before, not late
        assert "do" not in [k for k, _, _ in LOG[sid]]
    assert time.monotonic() - began < hang


async def test_the_last_retry_before_trust_ends_can_still_save_the_lease(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two renewals refused, the third answers: the third is made early enough (a grid cell
    before trust ends) for its answer to count, so the run keeps its lease. (Made at the
    instant trust ended, the call would always be cut short by the rule that a run stops
    when its trust ends while a call is in flight.)"""
    lease = 2 * LEASE  # a grid cell of 0.2 s: the calls' own timing fits well within it
    quantum = lease / 12
    renewals = _Renewals(storage, monkeypatch)
    fence = await _leased(storage, "o", lease)
    keeper = LeaseKeeper(storage, fence, lease)

    async def refuse_twice(call: _Call) -> None:
        renewals.refuse = len(renewals.calls) <= 2

    renewals.hook = refuse_twice
    # Register half a grid cell past a cell boundary. The second attempt is then due half a
    # cell before the last-retry slot, so the third is that slot. Registered just past a
    # boundary, the second attempt falls at the last-retry slot itself (it is the last
    # retry, rightly) and the third only when trust ends: CI once registered there.
    # A sleep may overshoot on a loaded machine: aim again until the phase is right.
    while not 0.3 < time.monotonic() % quantum / quantum < 0.7:
        await anyio.sleep((quantum * 1.5 - time.monotonic() % quantum) % quantum)
    registered = time.monotonic()
    keeper.start()
    try:
        with anyio.fail_after(10):
            while not any(c.held for c in renewals.calls) and not keeper.lost:
                await anyio.sleep(0.005)
    finally:
        keeper.stop()
    first, second, third = renewals.calls[:3]
    assert first.held is None and second.held is None  # refused
    assert third.held == {fence.saga_id}
    assert not keeper.lost
    # Trust ran from registration; the third call was made a grid cell before it ended.
    assert third.started < registered + lease * 3 / 4 - quantum / 2


_CALLER_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("caller_var", default="unset")


async def test_the_driver_carries_none_of_the_callers_context_variables(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver task outlives the run that started it and serves every run: it must not
    carry that run's context variables (a trace span, say) into the calls it makes for all."""
    lease = LEASE
    renewals = _Renewals(storage, monkeypatch)
    seen: list[str] = []

    async def look(call: _Call) -> None:
        seen.append(_CALLER_VAR.get())

    renewals.hook = look
    token = _CALLER_VAR.set("the first run's span")
    try:
        keeper = LeaseKeeper(storage, await _leased(storage, "o", lease), lease)
        keeper.start()
    finally:
        _CALLER_VAR.reset(token)
    try:
        with anyio.fail_after(10):
            while not renewals.calls or renewals.calls[0].ended is None:
                await anyio.sleep(0.005)
    finally:
        keeper.stop()
    assert seen[0] == "unset"


async def test_closing_the_storage_waits_for_a_renewal_in_flight(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last run ends while the driver's renewal call is in flight (the call outlives the
    runs it serves): ``aclose`` waits for that call before it closes the pool under it. The
    call is held up for real: another transaction holds the saga's row (PostgreSQL) or the
    database's write lock (SQLite)."""
    lease = LEASE
    target = create_storage(storage.engine.url.render_as_string(hide_password=False))
    renewals = _Renewals(target, monkeypatch)
    fence = await _leased(target, "o", lease)
    keeper = LeaseKeeper(target, fence, lease)
    sagas = target.tables.sagas
    blocker = target.engine.connect()
    blocker.begin()  # SQLite: BEGIN IMMEDIATE, the write lock
    blocker.execute(update(sagas).where(sagas.c.id == fence.saga_id).values(note="held"))
    released: list[float] = []

    async def release_later() -> None:
        await anyio.sleep(0.3)
        released.append(time.monotonic())
        blocker.commit()
        blocker.close()

    keeper.start()
    with anyio.fail_after(20):
        while not renewals.calls:
            await anyio.sleep(0.005)
        await anyio.sleep(0.05)  # the call now waits for the lock, in its thread
        keeper.stop()  # the last run ends
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_later)
            await target.aclose()
            closed = time.monotonic()
    ended = renewals.calls[0].ended
    assert released and ended is not None
    assert released[0] <= ended <= closed  # the call ended after the lock went, then the pool
    assert renewals.calls[0].held is not None  # and was answered
