"""The public calls: start/get/result, idempotent ids, bad input, cancel, the sketch's form."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select

from saga_core import (
    DeclarativeSaga,
    SagaConflict,
    SagaFailed,
    SagaNotFound,
    SagaOrchestrator,
    SagaStatus,
    StepContext,
    StepRejected,
    StepStatus,
    compensate,
    step,
)
from saga_core.errors import SagaError
from saga_storage import SqlStorage, create_storage
from tests.engine.sagas import LOG, ChainSaga, OrderSaga, done, record, undone

pytestmark = pytest.mark.anyio


def _uid() -> str:
    return f"api-{uuid.uuid4().hex[:10]}"


def _count(storage: SqlStorage, table: str) -> int:
    t = getattr(storage.tables, table)
    with storage.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(t)).scalar_one())


async def test_sketch_execute_form(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid()
    result = await OrderSaga().execute(orch, saga_id=sid, initial_context={"amount": 1})
    assert result["order_id"] == f"ORD-{sid}"


async def test_start_without_worker_stays_pending(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = await orch.start(OrderSaga(), context={"amount": 1}, saga_id=_uid())
    state = await orch.get(sid)
    assert state.status == SagaStatus.PENDING
    assert state.lease_owner is None
    assert set(state.steps) == {"create_order", "charge_payment", "ship"}
    assert done(sid) == []


async def test_start_in_open_orchestrator_runs_in_background(storage: SqlStorage) -> None:
    async with SagaOrchestrator(storage) as orch:
        sid = await orch.start(OrderSaga, context={"amount": 1}, saga_id=_uid())
        result = await orch.result(sid, timeout=10)
        assert result["tracking"] == "T-1"
        failing = await orch.start(OrderSaga(), context={"amount": 1, "fail_ship": True})
        with pytest.raises(SagaFailed) as info:
            await orch.result(failing, timeout=10)
        assert info.value.status == SagaStatus.COMPENSATED
    assert (await orch.get(sid)).status == SagaStatus.COMPLETED


async def test_result_of_finished_saga_from_storage(storage: SqlStorage) -> None:
    sid = _uid()
    with pytest.raises(SagaFailed):
        await SagaOrchestrator(storage).execute(ChainSaga(), context={"fail_c": True}, saga_id=sid)
    other = SagaOrchestrator(storage)  # knows nothing in memory: reads storage
    with pytest.raises(SagaFailed) as info:
        await other.result(sid, timeout=5)
    assert info.value.status == SagaStatus.COMPENSATED
    assert info.value.step == "c"
    assert info.value.cause is None  # it happened in another orchestrator


async def test_result_times_out_for_pending_saga(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = await orch.start(OrderSaga(), context={"amount": 1})
    with pytest.raises(TimeoutError):
        await orch.result(sid, timeout=0.2)


async def test_same_id_same_input_returns_same_saga(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = _uid()
    first = await orch.execute(OrderSaga(), context={"amount": 3}, saga_id=sid)
    again = await orch.execute(OrderSaga(), context={"amount": 3}, saga_id=sid)
    assert again == first
    assert done(sid) == ["create_order", "charge_payment", "ship"]  # ran once
    assert await orch.start(OrderSaga(), context={"amount": 3}, saga_id=sid) == sid


async def test_same_id_different_input_conflicts(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = await orch.start(OrderSaga(), context={"amount": 3}, saga_id=_uid())
    with pytest.raises(SagaConflict, match="different input"):
        await orch.start(OrderSaga(), context={"amount": 4}, saga_id=sid)
    with pytest.raises(SagaConflict, match="type"):
        await orch.start(ChainSaga(), context={"amount": 3}, saga_id=sid)
    assert isinstance(SagaConflict("x", "y"), ValueError)


async def test_unknown_saga_id(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    with pytest.raises(SagaNotFound, match="nope") as info:
        await orch.get("nope")
    assert isinstance(info.value, LookupError)
    with pytest.raises(SagaNotFound):
        await orch.result("nope", timeout=1)
    with pytest.raises(SagaNotFound):
        await orch.cancel("nope")


@pytest.mark.parametrize(
    ("context", "named"),
    [
        ({"amount": 1, "when": object()}, "['when']"),
        ({"amount": 1, "nested": {"deep": [1, {1, 2}]}}, "['nested']['deep'][1]"),
        ({"amount": float("nan")}, "['amount']"),
        ({1: "x"}, "key 1"),
    ],
)
async def test_bad_context_is_refused_before_anything_is_written(
    storage: SqlStorage, context: dict[Any, Any], named: str
) -> None:
    orch = SagaOrchestrator(storage)
    before = (_count(storage, "sagas"), _count(storage, "steps"), _count(storage, "outbox"))
    with pytest.raises(TypeError, match="not JSON-serialisable") as info:
        await orch.execute(OrderSaga(), context=context, saga_id=_uid())
    assert named in str(info.value)
    with pytest.raises(TypeError):
        await orch.start(OrderSaga(), context=context)
    after = (_count(storage, "sagas"), _count(storage, "steps"), _count(storage, "outbox"))
    assert after == before


async def test_context_must_be_a_mapping(storage: SqlStorage) -> None:
    with pytest.raises(TypeError, match="context must be a mapping"):
        await SagaOrchestrator(storage).execute(OrderSaga(), context=[1, 2])  # type: ignore[arg-type]
    assert _count(storage, "sagas") == 0


async def test_bad_saga_id(storage: SqlStorage) -> None:
    with pytest.raises(ValueError, match="saga_id"):
        await SagaOrchestrator(storage).execute(OrderSaga(), context={}, saga_id="x" * 300)
    # Not a driver's encoding error from inside the insert: named, before anything is written.
    with pytest.raises(ValueError, match="saga_id is not valid Unicode text"):
        await SagaOrchestrator(storage).execute(OrderSaga(), context={}, saga_id="order-\ud800")
    assert _count(storage, "sagas") == 0


def test_invalid_database_urls() -> None:
    with pytest.raises(ValueError, match="invalid database URL"):
        create_storage("not a url")
    with pytest.raises(ValueError, match="unsupported database 'mysql'"):
        create_storage("mysql://user:secret@localhost/db")
    try:
        create_storage("mysql://user:secret@localhost/db")
    except ValueError as exc:
        assert "secret" not in str(exc)


def test_invalid_broker_urls() -> None:
    from saga_brokers import create_broker

    with pytest.raises(ValueError, match="unknown broker URL scheme 'nats'"):
        create_broker("nats://localhost")
    with pytest.raises(ValueError, match="scheme://"):
        create_broker("localhost:9092")


class _Clean(DeclarativeSaga):
    saga_type = "test-clean-failures"

    @step()
    async def lookup(self, ctx: StepContext) -> dict[str, Any]:
        return {}

    @compensate("lookup")
    async def undo_lookup(self, ctx: StepContext) -> None:
        record(ctx, "undo")

    @step(depends_on=["lookup"], clean_failures=[KeyError])
    async def listed(self, ctx: StepContext) -> dict[str, Any]:
        if ctx["mode"] == "listed":
            raise KeyError("no such account")
        return {}

    @compensate("listed")
    async def undo_listed(self, ctx: StepContext) -> None:
        record(ctx, "undo")

    @step(depends_on=["listed"], compensate_on_failure=False)
    async def never_dirty(self, ctx: StepContext) -> dict[str, Any]:
        if ctx["mode"] == "never_dirty":
            raise RuntimeError("anything")
        raise StepRejected("stop here")

    @compensate("never_dirty")
    async def undo_never_dirty(self, ctx: StepContext) -> None:
        record(ctx, "undo")


@pytest.mark.parametrize("mode", ["listed", "never_dirty"])
async def test_clean_failures_are_not_compensated(storage: SqlStorage, mode: str) -> None:
    sid = _uid()
    with pytest.raises(SagaFailed):
        await SagaOrchestrator(storage).execute(_Clean(), context={"mode": mode}, saga_id=sid)
    expected = ["lookup"] if mode == "listed" else ["listed", "lookup"]
    assert undone(sid) == expected
    state = await SagaOrchestrator(storage).get(sid)
    failed = "listed" if mode == "listed" else "never_dirty"
    assert state.steps[failed].status == StepStatus.REJECTED


class _Slow(DeclarativeSaga):
    saga_type = "test-cancel"

    @step()
    async def first(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        return {"first": True}

    @compensate("first")
    async def undo_first(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)

    @step(depends_on=["first"])
    async def long(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "start")
        await anyio.sleep(30)
        return {}

    @compensate("long")
    async def undo_long(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)


async def test_cancel_running_saga_compensates(storage: SqlStorage) -> None:
    sid = _uid()
    async with SagaOrchestrator(storage) as orch:
        await orch.start(_Slow(), saga_id=sid)
        with anyio.fail_after(5):
            while ("start", "long", None) not in LOG[sid]:
                await anyio.sleep(0.01)
            state = await orch.cancel(sid)
    assert state.status == SagaStatus.COMPENSATED
    assert state.error is not None and state.error.type == "Cancelled"
    assert [(s, x) for k, s, x in LOG[sid] if k == "undo"] == [
        ("long", "unknown"),
        ("first", "succeeded"),
    ]


async def test_cancel_pending_saga_and_settled_saga(storage: SqlStorage) -> None:
    orch = SagaOrchestrator(storage)
    sid = await orch.start(_Slow(), saga_id=_uid())
    state = await orch.cancel(sid)
    assert state.status == SagaStatus.COMPENSATED
    assert undone(sid) == []  # nothing had run
    with pytest.raises(SagaError, match="already COMPENSATED"):
        await orch.cancel(sid)


class _Steady(DeclarativeSaga):
    saga_type = "test-steady"

    @step()
    async def wait_a_bit(self, ctx: StepContext) -> dict[str, Any]:
        await anyio.sleep(0.3)
        record(ctx, "do")
        return {"waited": True}


async def test_cancelling_the_caller_stops_waiting_not_the_saga(storage: SqlStorage) -> None:
    sid = _uid()
    async with SagaOrchestrator(storage) as orch:
        with anyio.move_on_after(0.1) as scope:
            await orch.execute(_Steady(), context={}, saga_id=sid)
        assert scope.cancelled_caught
        assert done(sid) == []
        result = await orch.result(sid, timeout=5)
    assert result["waited"] is True
    assert done(sid) == ["wait_a_bit"]


def test_a_chain_of_n_steps_costs_n_plus_one_write_transactions(tmp_path: Any) -> None:
    """Backs docs/configuration.md: a step's success records the next step's first attempt,
    the last one the saga's completion, and the creator the root's first attempt."""
    import contextlib

    storage = create_storage(f"sqlite:///{tmp_path / 'count.db'}")
    storage.coalesce = False  # one transaction per write, so they can be counted
    writes = 0
    inner = storage._write

    @contextlib.contextmanager
    def counted() -> Any:
        nonlocal writes
        writes += 1
        with inner() as conn:
            yield conn

    storage._write = counted  # type: ignore[method-assign]
    result = anyio.run(SagaOrchestrator(storage).execute, OrderSaga(), {"amount": 1})
    assert result["tracking"] == "T-1"
    assert writes == 4  # three chained steps + 1
    storage.dispose()


class _Threaded(DeclarativeSaga):
    """A sync step (run in a worker thread) that records how many run at once."""

    saga_type = "test-step-threads"
    lock = threading.Lock()
    running = 0
    most = 0

    @step()
    def work(self, ctx: StepContext) -> dict[str, Any]:
        cls = type(self)
        with cls.lock:
            cls.running += 1
            cls.most = max(cls.most, cls.running)
        try:
            time.sleep(0.1)
        finally:
            with cls.lock:
                cls.running -= 1
        return {}

    @step(depends_on=["work"])
    async def after(self, ctx: StepContext) -> dict[str, Any]:
        return {}  # an async step: it takes no thread


async def test_step_threads_bounds_the_sync_steps_running_at_once(storage: SqlStorage) -> None:
    """``step_threads`` is how many sync steps run at once, across every saga of the
    orchestrator; async steps take none of those threads."""
    _Threaded.most = 0
    orch = SagaOrchestrator(storage, step_threads=2)
    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(orch.execute, _Threaded(), {})
    assert _Threaded.most == 2
