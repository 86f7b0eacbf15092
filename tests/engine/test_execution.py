"""Running sagas end to end on real storage, under asyncio and trio."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from saga_brokers import InMemoryBroker
from saga_core import (
    DeclarativeSaga,
    OutboxWorker,
    SagaFailed,
    SagaOrchestrator,
    SagaStatus,
    StepContext,
    StepStatus,
    step,
)
from saga_core.records import Fence, SagaWrite
from saga_storage import SqlStorage
from tests.engine.sagas import (
    LOG,
    BadCompensationSaga,
    BadResultSaga,
    ChainSaga,
    DiamondSaga,
    FailFastDiamond,
    OrderSaga,
    RetrySaga,
    TimeoutSaga,
    done,
    undone,
)

pytestmark = pytest.mark.anyio


def _uid(prefix: str) -> str:
    import uuid

    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def test_success_merges_results_and_relays_events(
    storage: SqlStorage, broker: InMemoryBroker
) -> None:
    orch = SagaOrchestrator(storage, broker)
    sid = _uid("ok")
    result = await orch.execute(OrderSaga(), context={"amount": 10}, saga_id=sid)
    assert result.saga_id == sid
    assert result["order_id"] == f"ORD-{sid}"
    assert result["charge_id"] == f"CHG-ORD-{sid}"
    assert result["tracking"] == "T-1"
    assert result["amount"] == 10
    assert set(result.results) == {"create_order", "charge_payment", "ship"}
    assert done(sid) == ["create_order", "charge_payment", "ship"]
    state = await orch.get(sid)
    assert state.status == SagaStatus.COMPLETED
    assert state.lease_owner is None  # released with the final write
    assert all(s.status == StepStatus.SUCCEEDED and s.attempts == 1 for s in state.steps.values())
    await OutboxWorker(storage, broker).drain()  # whatever the optimistic path left
    msgs = broker.messages()
    assert [m.headers["event_type"] for m in msgs if m.key == sid] == [
        "create_order_completed",
        "charge_payment_completed",
        "ship_completed",
    ]
    first = msgs[0]
    assert first.topic == "order"  # aggregate_type of create_order
    assert first.headers["saga_id"] == sid
    assert first.headers["content-type"] == "application/json"
    assert json.loads(first.value)["result"] == {"order_id": f"ORD-{sid}"}
    assert {m.topic for m in msgs} == {"order", "saga"}  # steps without aggregate_type -> "saga"


async def test_default_reverse_order_compensation(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("chain")
    with pytest.raises(SagaFailed) as info:
        await orch.execute(ChainSaga(), context={"fail_c": True}, saga_id=sid)
    exc = info.value
    assert exc.status == SagaStatus.COMPENSATED
    assert exc.step == "c"
    assert exc.error is not None and exc.error.type.endswith("StepRejected")
    assert undone(sid) == ["b", "a"]  # c was rejected cleanly: not compensated
    state = await orch.get(sid)
    assert state.steps["c"].status == StepStatus.REJECTED
    assert state.steps["a"].status == state.steps["b"].status == StepStatus.COMPENSATED


async def test_explicit_order_refund_after_cancel(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("order")
    with pytest.raises(SagaFailed) as info:
        await orch.execute(OrderSaga(), context={"amount": 5000}, saga_id=sid)
    assert info.value.step == "charge_payment"
    assert isinstance(info.value.cause, RuntimeError)
    # charge raised: unknown outcome, so refund runs, and only after the slow cancel finished.
    assert undone(sid) == ["create_order", "charge_payment"]
    refund = next(x for k, s, x in LOG[sid] if k == "undo" and s == "charge_payment")
    assert refund == ("unknown", None, f"{sid}:charge_payment:compensate")
    cancel = next(x for k, s, x in LOG[sid] if k == "undo" and s == "create_order")
    assert cancel == "succeeded"


async def test_rejected_step_after_success_compensates_in_declared_order(
    storage: SqlStorage,
) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("order")
    with pytest.raises(SagaFailed):
        await orch.execute(OrderSaga(), context={"amount": 5, "fail_ship": True}, saga_id=sid)
    assert undone(sid) == ["create_order", "charge_payment"]
    refund = next(x for k, s, x in LOG[sid] if k == "undo" and s == "charge_payment")
    assert refund[0] == "succeeded" and refund[1] == f"CHG-ORD-{sid}"


async def test_diamond_waits_for_running_sibling_before_compensating(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("diamond")
    with pytest.raises(SagaFailed) as info:
        await orch.execute(DiamondSaga(), saga_id=sid)
    assert info.value.step == "fast_fail"
    kinds = [(k, s) for k, s, _ in LOG[sid]]
    # slow was in flight when fast_fail failed: it finished before any compensation started
    assert kinds.index(("do", "slow")) < kinds.index(("undo", "slow"))
    first_undo = min(i for i, (k, _) in enumerate(kinds) if k == "undo")
    assert kinds.index(("do", "slow")) < first_undo
    assert "bottom" not in done(sid)  # nothing new starts after a failure
    und = undone(sid)
    assert und[-1] == "top"  # undone last: both branches depend on it
    assert set(und) == {"top", "fast_fail", "slow"}  # fast_fail raised: unknown, compensated
    state = await orch.get(sid)
    assert state.steps["slow"].outcome == "succeeded"
    assert state.steps["fast_fail"].outcome == "unknown"
    assert state.steps["bottom"].status == StepStatus.PENDING


async def test_fail_fast_cancels_running_sibling(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("ff")
    with anyio.fail_after(8):  # slow would take 30 s: it must have been cancelled
        with pytest.raises(SagaFailed):
            await orch.execute(FailFastDiamond(), context={"slow_seconds": 30}, saga_id=sid)
    assert "slow" not in done(sid)  # cancelled before it finished
    state = await orch.get(sid)
    assert state.steps["slow"].outcome == "unknown"  # cancelled mid-flight: unknown
    assert set(undone(sid)) == {"top", "fast_fail", "slow"}
    assert undone(sid)[-1] == "top"


async def test_retries_reuse_idempotency_key(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("retry")
    result = await orch.execute(RetrySaga(), context={"failures": 2}, saga_id=sid)
    assert result["attempts_needed"] == 3
    tries = [x for k, _, x in LOG[sid] if k == "do"]
    assert tries == [(1, f"{sid}:flaky"), (2, f"{sid}:flaky"), (3, f"{sid}:flaky")]
    state = await orch.get(sid)
    assert state.steps["flaky"].attempts == 3
    assert state.steps["flaky"].status == StepStatus.SUCCEEDED


async def test_retries_exhausted_compensates_unknown(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("retry")
    with pytest.raises(SagaFailed) as info:
        await orch.execute(RetrySaga(), context={"failures": 5}, saga_id=sid)
    assert info.value.error is not None and "attempt 3 failed" in info.value.error.message
    assert len(done(sid)) == 3  # max_attempts=3
    assert [x for k, _, x in LOG[sid] if k == "undo"] == ["unknown"]
    state = await orch.get(sid)
    assert state.steps["flaky"].attempts == 3


async def test_async_timeout_is_unknown_and_compensated(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("timeout")
    with anyio.fail_after(3):
        with pytest.raises(SagaFailed) as info:
            await orch.execute(TimeoutSaga(), context={"slow": "async"}, saga_id=sid)
    assert info.value.step == "slow_async"
    assert "timed out" in str(info.value.error)
    undo = {s: x for k, s, x in LOG[sid] if k == "undo"}
    assert undo["slow_async"] == "unknown"
    assert undo["first"] == "succeeded"
    assert undone(sid)[-1] == "first"


async def test_sync_timeout_unknown_at_once_and_late_outcome_recorded(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("timeout")
    with anyio.fail_after(5):
        with pytest.raises(SagaFailed) as info:
            await orch.execute(TimeoutSaga(), context={"slow": "sync"}, saga_id=sid)
    assert info.value.step == "slow_sync"
    kinds = [(k, s) for k, s, _ in LOG[sid]]
    # the thread was not abandoned: its compensation waited until it really finished
    assert kinds.index(("do", "slow_sync")) < kinds.index(("undo", "slow_sync"))
    undo = {s: x for k, s, x in LOG[sid] if k == "undo"}
    assert undo["slow_sync"] == ("unknown", 42)  # the late result reaches the compensation
    state = await orch.get(sid)
    assert state.steps["slow_sync"].result == {"late_value": 42}
    assert state.steps["slow_sync"].outcome == "unknown"


async def test_failed_compensation_ends_failed_and_blocks_only_successors(
    storage: SqlStorage,
) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("badcomp")
    with pytest.raises(SagaFailed) as info:
        await orch.execute(BadCompensationSaga(), saga_id=sid)
    exc = info.value
    assert exc.status == SagaStatus.FAILED
    assert exc.reason == "compensation_failed"
    assert set(exc.compensation_errors) == {"b"}
    assert "refund service down" in exc.compensation_errors["b"].message
    assert [s for k, s, _ in LOG[sid] if k == "try-undo"] == ["b", "b", "b"]
    # undo_c waits for undo_b (explicit), which gave up: never runs. undo_a is independent.
    assert undone(sid) == ["a"]
    state = await orch.get(sid)
    assert state.status == SagaStatus.FAILED and state.reason == "compensation_failed"
    assert state.steps["b"].status == StepStatus.COMPENSATION_FAILED
    assert state.steps["b"].compensation_attempts == 3
    assert state.steps["c"].status == StepStatus.SUCCEEDED  # blocked, still to undo
    assert state.steps["a"].status == StepStatus.COMPENSATED


async def test_unstorable_result_is_unknown_and_compensated(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid("badresult")
    with pytest.raises(SagaFailed) as info:
        await orch.execute(BadResultSaga(), saga_id=sid)
    assert info.value.error is not None
    assert info.value.error.type == "TypeError"
    assert "['when']" in info.value.error.message and "object" in info.value.error.message
    assert [x for k, _, x in LOG[sid] if k == "undo"] == ["unknown"]
    state = await orch.get(sid)
    assert state.steps["leaky"].result is None
    assert state.status == SagaStatus.COMPENSATED


async def test_hundred_concurrent_sagas_compensate_only_their_own(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    ids = [_uid("many") for _ in range(100)]
    outcomes: dict[str, Any] = {}

    async def one(i: int, sid: str) -> None:
        fail = i % 2 == 0
        try:
            outcomes[sid] = await orch.execute(
                OrderSaga(), context={"amount": 5, "fail_ship": fail}, saga_id=sid
            )
        except SagaFailed as exc:
            outcomes[sid] = exc

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i, sid in enumerate(ids):
                tg.start_soon(one, i, sid)
    for i, sid in enumerate(ids):
        if i % 2 == 0:
            assert isinstance(outcomes[sid], SagaFailed), sid
            assert outcomes[sid].status == SagaStatus.COMPENSATED
            assert undone(sid) == ["create_order", "charge_payment"]
            refund = next(x for k, s, x in LOG[sid] if k == "undo" and s == "charge_payment")
            assert refund[1] == f"CHG-ORD-{sid}"  # its own charge, nobody else's
        else:
            assert outcomes[sid]["order_id"] == f"ORD-{sid}"
            assert undone(sid) == []
    counts = {s: len(await storage.list_sagas(status=s, limit=1000)) for s in SagaStatus}
    assert counts[SagaStatus.COMPLETED] == 50 and counts[SagaStatus.COMPENSATED] == 50


class _AsyncSteps(DeclarativeSaga):
    """Only async steps: without a broker its run has no task group, only a cancel scope."""

    saga_type = "test-error-surface-async"

    @step()
    async def first(self, ctx: StepContext) -> dict[str, Any]:
        return {"first": 1}

    @step(depends_on=["first"])
    async def second(self, ctx: StepContext) -> dict[str, Any]:
        return {"second": 1}


class _ThreadStep(_AsyncSteps):
    """A sync step (a worker thread): its run has a task group."""

    saga_type = "test-error-surface-thread"

    @step(depends_on=["first"])
    def second(self, ctx: StepContext) -> dict[str, Any]:
        return {"second": 1}


@pytest.mark.parametrize("saga_cls", [_AsyncSteps, _ThreadStep])
@pytest.mark.parametrize("with_broker", [False, True], ids=["no-broker", "broker"])
async def test_an_unexpected_error_reaches_the_caller_as_itself(
    storage: SqlStorage,
    saga_cls: type[DeclarativeSaga],
    with_broker: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run keeps a task group only when something runs beside its steps (a publish, a
    worker thread). With or without one, an error the engine does not expect (the storage
    failing with a RuntimeError, as a bug would) reaches ``execute()``'s caller as itself, not
    wrapped in an ExceptionGroup by some runs and not by others."""
    real = storage.write

    def write(fence: Fence, change: SagaWrite, **kw: Any) -> Any:
        if change.events:  # the first step's success

            async def fail() -> Any:
                raise RuntimeError("storage bug")

            return fail()
        return real(fence, change, **kw)

    monkeypatch.setattr(storage, "write", write)
    orch = SagaOrchestrator(storage, InMemoryBroker() if with_broker else None)
    with pytest.raises(RuntimeError, match="storage bug"):
        await orch.execute(saga_cls(), context={})
