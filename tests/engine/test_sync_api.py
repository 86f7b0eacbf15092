"""``SyncSagaOrchestrator``: shared by plain threads; refuses calls that would deadlock."""

from __future__ import annotations

import asyncio
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import pytest

from saga_brokers import InMemoryBroker
from saga_core import (
    BlockingCallInEventLoop,
    DeclarativeSaga,
    SagaFailed,
    SagaStatus,
    StepContext,
    SyncSagaOrchestrator,
    step,
)
from saga_storage import SqlStorage
from tests.engine.sagas import OrderSaga, undone


def test_shared_between_threads(storage: SqlStorage) -> None:
    broker = InMemoryBroker()
    ids = [f"sync-{uuid.uuid4().hex[:8]}" for _ in range(40)]
    threads_seen: set[int] = set()
    with SyncSagaOrchestrator(storage, broker) as orch:

        def one(i: int) -> Any:
            threads_seen.add(threading.get_ident())
            try:
                return orch.execute(
                    OrderSaga(), context={"amount": 1, "fail_ship": i % 4 == 0}, saga_id=ids[i]
                )
            except SagaFailed as exc:
                return exc

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one, range(len(ids))))
        for i, r in enumerate(results):
            if i % 4 == 0:
                assert isinstance(r, SagaFailed) and r.status == SagaStatus.COMPENSATED
                assert undone(ids[i]) == ["create_order", "charge_payment"]
            else:
                assert r["order_id"] == f"ORD-{ids[i]}"
        assert orch.get(ids[1]).status == SagaStatus.COMPLETED
        sid = orch.start(OrderSaga(), context={"amount": 2})
        assert orch.result(sid, timeout=10)["tracking"] == "T-1"
    assert len(threads_seen) > 1


def test_blocking_call_inside_asyncio_loop_raises(storage: SqlStorage) -> None:
    orch = SyncSagaOrchestrator(storage)

    async def inside() -> None:
        orch.execute(OrderSaga(), context={"amount": 1})

    with pytest.raises(BlockingCallInEventLoop, match="inside a running asyncio event loop"):
        asyncio.run(inside())
    orch.close()


def test_blocking_call_inside_trio_loop_raises(storage: SqlStorage) -> None:
    orch = SyncSagaOrchestrator(storage)

    async def inside() -> None:
        orch.get("x")

    with pytest.raises(BlockingCallInEventLoop, match="trio"):
        anyio.run(inside, backend="trio")
    orch.close()


_NESTED: dict[str, Any] = {}


class _Nested(DeclarativeSaga):
    saga_type = "test-nested-sync"

    @step()
    def outer(self, ctx: StepContext) -> dict[str, Any]:
        try:
            _NESTED["orch"].execute(OrderSaga(), context={"amount": 1})
        except BlockingCallInEventLoop as exc:
            return {"refused": str(exc)}
        return {"refused": None}


def test_blocking_call_from_step_thread_raises(storage: SqlStorage) -> None:
    with SyncSagaOrchestrator(storage) as orch:
        _NESTED["orch"] = orch
        result = orch.execute(_Nested(), context={})
    assert result["refused"] is not None and "step's thread" in result["refused"]


def test_close_is_idempotent_and_reopens(storage: SqlStorage) -> None:
    orch = SyncSagaOrchestrator(storage)
    orch.close()
    r = orch.execute(OrderSaga(), context={"amount": 1})
    assert r["tracking"] == "T-1"
    orch.close()
    orch.close()


def test_reused_after_fork(storage: SqlStorage) -> None:
    import multiprocessing
    import warnings

    with SyncSagaOrchestrator(storage) as orch:
        assert orch.execute(OrderSaga(), context={"amount": 1})["tracking"] == "T-1"
        with warnings.catch_warnings():
            # Forking a process that runs threads is what users do (gunicorn --preload, Celery);
            # the loop thread is exactly what the orchestrator re-creates after fork.
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = multiprocessing.get_context("fork")
            queue = ctx.Queue()
            child = ctx.Process(target=_child_execute, args=(orch, storage, queue))
            child.start()
            child.join(60)
        assert child.exitcode == 0
        assert queue.get(timeout=5) == "T-1"


def _child_execute(orch: SyncSagaOrchestrator, storage: SqlStorage, queue: Any) -> None:
    # SQLAlchemy's rule after fork: drop (without closing) the parent's pooled connections.
    storage.engine.dispose(close=False)
    queue.put(orch.execute(OrderSaga(), context={"amount": 2})["tracking"])
