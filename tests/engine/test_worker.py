"""Workers, leases and fencing on real storage (in-process; crash tests with real processes are
in tests/recovery)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
import pytest
from sqlalchemy import update

from saga_core import (
    DeclarativeSaga,
    LeaseLost,
    RetryPolicy,
    SagaOrchestrator,
    SagaStatus,
    SagaWorker,
    StepContext,
    StepStatus,
    resolve_saga,
    retry_saga,
    step,
)
from saga_core.errors import SagaError
from saga_core.records import NewSaga, SagaWrite, StepState
from saga_storage import SqlStorage
from tests.engine.sagas import LOG, BadCompensationSaga, OrderSaga, done, record, undone

pytestmark = pytest.mark.anyio


def _sid() -> str:
    return f"w-{uuid.uuid4().hex[:10]}"


async def test_worker_runs_pending_sagas(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    ids = [
        await orch.start(
            OrderSaga(), context={"amount": 1, "fail_ship": i % 3 == 0}, saga_id=_sid()
        )
        for i in range(9)
    ]
    worker = SagaWorker(storage, sagas=[OrderSaga], lease_seconds=5)
    assert await worker.run_once() == 9
    for i, sid in enumerate(ids):
        state = await orch.get(sid)
        assert state.status == (SagaStatus.COMPENSATED if i % 3 == 0 else SagaStatus.COMPLETED)
        assert state.lease_owner is None
    assert await worker.run_once() == 0  # nothing left to claim


async def test_worker_ignores_unknown_types_and_versions(storage: SqlStorage) -> None:
    foreign = NewSaga(_sid(), OrderSaga.saga_type, "0" * 16, {"amount": 1}, ("create_order",))
    await storage.create_saga(foreign, lease_owner=None, lease_seconds=1)
    other_type = NewSaga(_sid(), "nobody-knows", "1" * 16, {}, ("x",))
    await storage.create_saga(other_type, lease_owner=None, lease_seconds=1)
    worker = SagaWorker(storage, sagas=[OrderSaga], lease_seconds=5, poll_interval=0.05)
    assert await worker.run_once() == 0
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)  # its first scan notes the sagas it cannot run
            await anyio.sleep(0.2)
            worker.stop()
    state = await storage.load_saga(foreign.saga_id)
    assert state.status == SagaStatus.PENDING  # never advanced
    assert state.note is not None and "definition differs" in state.note
    assert OrderSaga.definition().version in state.note
    assert (await storage.load_saga(other_type.saga_id)).note is None  # not our type


async def test_expired_lease_is_taken_over_and_open_attempt_counted(storage: SqlStorage) -> None:
    d = OrderSaga.definition()
    sid = _sid()
    _, fence = await storage.create_saga(
        NewSaga(sid, d.saga_type, d.version, {"amount": 1}, d.step_names),
        lease_owner="dead-worker",
        lease_seconds=1.0,  # long enough to be still valid at the first scan, however slow
    )
    assert fence is not None
    # The dead worker had started create_order and never reported back.
    started = StepState("create_order", StepStatus.RUNNING, attempts=1, started_at=time.time())
    await storage.write(fence, SagaWrite(steps=(started,)))
    worker = SagaWorker(storage, sagas=[OrderSaga], lease_seconds=5)
    assert await worker.run_once() == 0  # lease still valid
    await anyio.sleep(1.1)
    assert await worker.run_once() == 1
    state = await storage.load_saga(sid)
    assert state.status == SagaStatus.COMPLETED
    assert state.lease_epoch == 2  # claimed once more: the epoch fences the dead worker
    assert state.steps["create_order"].crashes == 1
    assert state.steps["create_order"].attempts == 2  # the open attempt, then the re-run
    with pytest.raises(LeaseLost):  # the old owner can write nothing any more
        await storage.write(fence, SagaWrite(steps=(started,)))
    assert (await storage.load_saga(sid)).steps["create_order"].status == StepStatus.SUCCEEDED


async def test_crash_loop_parks_the_saga(storage: SqlStorage) -> None:
    d = OrderSaga.definition()
    sid = _sid()
    _, fence = await storage.create_saga(
        NewSaga(sid, d.saga_type, d.version, {"amount": 1}, d.step_names),
        lease_owner="dead-worker",
        lease_seconds=0.05,
    )
    assert fence is not None
    looping = StepState(
        "create_order", StepStatus.RUNNING, attempts=4, crashes=4, started_at=time.time()
    )
    await storage.write(fence, SagaWrite(steps=(looping,)))
    await anyio.sleep(0.1)
    assert await SagaWorker(storage, sagas=[OrderSaga], max_crashes=5).run_once() == 1
    state = await storage.load_saga(sid)
    assert state.status == SagaStatus.FAILED
    assert state.reason == "crash_loop"
    assert state.failed_step == "create_order"
    assert state.steps["create_order"].crashes == 5
    assert done(sid) == []  # the looping step was not run a sixth time


class _Slow(DeclarativeSaga):
    saga_type = "test-worker-slow"

    @step()
    async def slow(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "start")
        await anyio.sleep(ctx["seconds"])
        record(ctx, "do")
        return {}

    @step(depends_on=["slow"])
    async def after(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        return {}


async def test_renewal_keeps_a_long_step_owned(storage: SqlStorage) -> None:
    # A 1.5 s lease, not shorter: a renewal must answer within 5/12 of the lease. With 0.4 s,
    # one SQLite renewal slowed past that by a loaded CI machine rightly stopped the run, and
    # the step ran twice; 1 s (0.42 s to answer, the first call a cold connection) is the
    # margin the lease tests outgrew (tests/engine/test_leases.py, LEASE).
    lease = 1.5
    sid = await SagaOrchestrator(storage).start(
        _Slow(), context={"seconds": 3 * lease}, saga_id=_sid()
    )
    a = SagaWorker(storage, sagas=[_Slow], lease_seconds=lease, owner="a")
    b = SagaWorker(storage, sagas=[_Slow], lease_seconds=lease, owner="b", poll_interval=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run_once)
        await anyio.sleep(0.1)
        tg.start_soon(b.run)  # keeps scanning while a's step runs three leases long
        with anyio.fail_after(15):
            while (await storage.load_saga(sid)).status != SagaStatus.COMPLETED:
                await anyio.sleep(0.05)
        b.stop()
    assert [k for k, s, _ in LOG[sid] if s == "slow"] == ["start", "do"]  # ran once, by a
    assert (await storage.load_saga(sid)).lease_epoch == 1


async def test_lost_lease_stops_the_run_and_writes_nothing(storage: SqlStorage) -> None:
    sid = await SagaOrchestrator(storage).start(_Slow(), context={"seconds": 0.6}, saga_id=_sid())
    a = SagaWorker(storage, sagas=[_Slow], lease_seconds=0.3, owner="a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run_once)
        with anyio.fail_after(5):
            while ("start", "slow", None) not in LOG[sid]:
                await anyio.sleep(0.01)
        # Another worker takes the saga over (as after a pause past the lease).
        sagas = storage.tables.sagas
        with storage.engine.begin() as conn:
            conn.execute(
                update(sagas)
                .where(sagas.c.id == sid)
                .values(lease_owner="b", lease_epoch=sagas.c.lease_epoch + 1)
            )
        before = await storage.load_saga(sid)
    after = await storage.load_saga(sid)
    assert after.lease_owner == "b"
    assert after.steps == before.steps  # a wrote nothing more
    assert "after" not in done(sid)  # and went no further
    assert "slow" not in done(sid)  # its in-flight step was cancelled
    assert not a.running


class _Waiting(DeclarativeSaga):
    saga_type = "test-worker-waiting"

    @step(retry=RetryPolicy(max_attempts=2, backoff=0.4, jitter=0))
    async def flaky(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do", ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("try later")
        return {"ok": True}


async def test_long_retry_wait_releases_the_lease(storage: SqlStorage) -> None:
    sid = await SagaOrchestrator(storage).start(_Waiting(), saga_id=_sid())
    worker = SagaWorker(storage, sagas=[_Waiting], suspend_after=0.2, lease_seconds=5)
    assert await worker.run_once() == 1
    state = await storage.load_saga(sid)
    assert state.status == SagaStatus.RUNNING
    assert state.lease_owner is None and state.wake_at is not None
    assert state.steps["flaky"].error is not None
    assert await worker.run_once() == 0  # not due yet
    await anyio.sleep(0.5)
    assert await worker.run_once() == 1
    state = await storage.load_saga(sid)
    assert state.status == SagaStatus.COMPLETED
    assert state.steps["flaky"].attempts == 2
    assert state.steps["flaky"].crashes == 0  # a planned wait is not a crash


async def test_operator_retry_and_resolve(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _sid()
    with pytest.raises(Exception, match="failed"):
        await orch.execute(BadCompensationSaga(), saga_id=sid)
    assert (await orch.get(sid)).reason == "compensation_failed"
    with pytest.raises(ValueError, match="note"):
        await resolve_saga(storage, sid, SagaStatus.COMPENSATED, " ")
    state = await retry_saga(storage, sid)
    assert state.status == SagaStatus.COMPENSATING
    assert state.lease_owner is None
    await SagaWorker(storage, sagas=[BadCompensationSaga]).run_once()
    state = await orch.get(sid)
    assert state.status == SagaStatus.FAILED  # undo_b still fails: three fresh attempts
    assert state.steps["b"].compensation_attempts == 3
    assert undone(sid) == ["a"]  # a was not compensated twice
    state = await resolve_saga(storage, sid, SagaStatus.COMPENSATED, "refunded b by hand")
    assert state.status == SagaStatus.COMPENSATED
    assert state.note is not None and "refunded b by hand" in state.note
    with pytest.raises(SagaError, match="only FAILED"):
        await retry_saga(storage, sid)
