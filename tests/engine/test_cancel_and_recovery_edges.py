"""Cancelling from another process, and outcomes that must count as unknown."""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
import pytest

from saga_core import (
    DeclarativeSaga,
    SagaFailed,
    SagaOrchestrator,
    SagaStatus,
    SagaWorker,
    StepContext,
    StepStatus,
    compensate,
    step,
)
from saga_core.errors import SagaError
from saga_core.records import NewSaga, SagaWrite, StepState
from saga_storage import SqlStorage, create_storage
from tests.engine.sagas import LOG, OrderSaga, record, undone

pytestmark = pytest.mark.anyio


def _sid() -> str:
    return f"edge-{uuid.uuid4().hex[:10]}"


class _Unstorable(DeclarativeSaga):
    saga_type = "test-unstorable-declared-clean"

    @step(compensate_on_failure=False, clean_failures=[TypeError])
    async def acts(self, ctx: StepContext) -> Any:
        return {"handle": object()}  # it acted, but its result cannot be stored

    @compensate("acts")
    async def undo_acts(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)


async def test_unstorable_result_is_unknown_whatever_the_step_declares(storage: SqlStorage) -> None:
    sid = _sid()
    with pytest.raises(SagaFailed):
        await SagaOrchestrator(storage).execute(_Unstorable(), saga_id=sid)
    state = await SagaOrchestrator(storage).get(sid)
    assert state.steps["acts"].outcome == "unknown"
    assert [x for k, _, x in LOG[sid] if k == "undo"] == ["unknown"]


async def _dead_worker_saga(storage: SqlStorage, open_step: str | None) -> str:
    d = OrderSaga.definition()
    sid = _sid()
    _, fence = await storage.create_saga(
        NewSaga(sid, d.saga_type, d.version, {"amount": 1}, d.step_names),
        lease_owner="dead-worker",
        lease_seconds=0.05,
    )
    assert fence is not None
    rows = [StepState("create_order", StepStatus.SUCCEEDED, "succeeded", 1, {"order_id": "O"})]
    if open_step:
        rows.append(StepState(open_step, StepStatus.RUNNING, attempts=1, started_at=time.time()))
    await storage.write(fence, SagaWrite(steps=tuple(rows)))
    await anyio.sleep(0.1)  # the dead worker's lease expires
    return sid


async def test_cancel_from_elsewhere_undoes_an_attempt_that_never_reported(
    storage: SqlStorage,
) -> None:
    sid = await _dead_worker_saga(storage, "charge_payment")
    state = await SagaOrchestrator(storage).cancel(sid)
    assert state.status == SagaStatus.COMPENSATED
    assert state.steps["charge_payment"].outcome == "unknown"
    assert undone(sid) == ["create_order", "charge_payment"]  # refund after cancel, as declared
    refund = next(x for k, s, x in LOG[sid] if k == "undo" and s == "charge_payment")
    assert refund[0] == "unknown"


async def test_recovery_after_a_crash_mid_step_reruns_it(storage: SqlStorage) -> None:
    sid = await _dead_worker_saga(storage, "charge_payment")
    assert await SagaWorker(storage, sagas=[OrderSaga]).run_once() == 1
    state = await storage.load_saga(sid)
    assert state.status == SagaStatus.COMPLETED
    assert state.steps["charge_payment"].crashes == 1
    assert state.steps["create_order"].attempts == 1  # recorded as done: never ran again


async def test_cancel_refusals_leave_no_lease(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _sid()
    with pytest.raises(SagaFailed):
        from tests.engine.sagas import BadCompensationSaga

        await orch.execute(BadCompensationSaga(), saga_id=sid)
    with pytest.raises(SagaError, match="FAILED"):
        await orch.cancel(sid)
    assert (await orch.get(sid)).lease_owner is None

    foreign = NewSaga(_sid(), OrderSaga.saga_type, "f" * 16, {"amount": 1}, ("create_order",))
    await storage.create_saga(foreign, lease_owner=None, lease_seconds=1)
    with pytest.raises(SagaError, match="must not act on it"):
        await orch.cancel(foreign.saga_id)
    after = await orch.get(foreign.saga_id)
    assert after.lease_owner is None
    assert after.status == SagaStatus.PENDING


class _Long(DeclarativeSaga):
    saga_type = "test-long-lease"

    @step()
    async def long(self, ctx: StepContext) -> dict[str, Any]:
        await anyio.sleep(2.0)  # past the trust of its 1.2 s lease (0.9 s): only renewals keep it
        return {"done": True}


async def test_execute_renews_its_own_short_lease(storage: SqlStorage) -> None:
    # Not shorter: a renewal has 5/12 of the lease to answer, which a loaded machine can miss.
    orch = SagaOrchestrator(storage, lease_seconds=1.2)
    sid = _sid()
    rival = SagaWorker(storage, sagas=[_Long], owner="rival", poll_interval=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(rival.run)
        result = await orch.execute(_Long(), saga_id=sid)
        rival.stop()
    assert result["done"] is True
    assert (await orch.get(sid)).lease_epoch == 1  # never taken over


class _Order(DeclarativeSaga):
    """Declared b before a, but b depends on a: the merge order is a, then b."""

    saga_type = "test-merge-order"

    @step(depends_on=["a"])
    async def b(self, ctx: StepContext) -> dict[str, Any]:
        return {"who": "b"}

    @step()
    async def a(self, ctx: StepContext) -> dict[str, Any]:
        return {"who": "a"}


async def test_result_from_storage_merges_like_execute(storage: SqlStorage) -> None:
    sid = _sid()
    direct = await SagaOrchestrator(storage).execute(_Order(), saga_id=sid)
    read = await SagaOrchestrator(storage).result(sid, timeout=5)
    assert direct["who"] == read["who"] == "b"


def test_unparseable_url_does_not_echo_its_password() -> None:
    with pytest.raises(ValueError, match="invalid database URL") as info:
        create_storage("postgresql+psycopg://user:s3cret@host:notaport/db")
    assert "s3cret" not in str(info.value)
