"""Pivot and retriable steps, and transactional steps (DESIGN.md sections 2 and 3)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text

from saga_core import (
    DeclarativeSaga,
    RetryPolicy,
    SagaFailed,
    SagaOrchestrator,
    SagaStatus,
    StepContext,
    StepRejected,
    StepStatus,
    compensate,
    step,
)
from saga_storage import SqlStorage
from tests.engine.sagas import done, record, undone

pytestmark = pytest.mark.anyio

ATTEMPTS: dict[str, int] = defaultdict(int)


class _Pivoted(DeclarativeSaga):
    saga_type = "test-pivot"

    @step()
    async def reserve(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do")
        return {}

    @compensate("reserve")
    async def release(self, ctx: StepContext) -> None:
        record(ctx, "undo")

    @step(depends_on=["reserve"], kind="pivot", retry=RetryPolicy(max_attempts=2, backoff=0.01))
    async def commit(self, ctx: StepContext) -> dict[str, Any]:
        record(ctx, "do", ctx.idempotency_key)
        mode = ctx["pivot"]
        if mode == "reject":
            raise StepRejected("no")
        if mode == "unknown":
            raise ConnectionError("lost reply")
        return {}

    @step(depends_on=["commit"], kind="retriable", retry=RetryPolicy(max_attempts=4, backoff=0.01))
    async def notify(self, ctx: StepContext) -> dict[str, Any]:
        ATTEMPTS[ctx.saga_id] += 1
        record(ctx, "do")
        if ATTEMPTS[ctx.saga_id] <= ctx["notify_failures"]:
            raise ConnectionError("mail server down")
        return {"notified": True}


def _sid() -> str:
    return f"kind-{uuid.uuid4().hex[:10]}"


async def test_retriable_after_pivot_retries_until_success(storage: SqlStorage) -> None:
    sid = _sid()
    r = await SagaOrchestrator(storage).execute(
        _Pivoted(), context={"pivot": "ok", "notify_failures": 3}, saga_id=sid
    )
    assert r["notified"] is True
    assert ATTEMPTS[sid] == 4


async def test_retriable_exhausted_parks_forward_stuck(storage: SqlStorage) -> None:
    sid = _sid()
    with pytest.raises(SagaFailed) as info:
        await SagaOrchestrator(storage).execute(
            _Pivoted(), context={"pivot": "ok", "notify_failures": 99}, saga_id=sid
        )
    assert info.value.status == SagaStatus.FAILED
    assert info.value.reason == "forward_stuck"
    assert undone(sid) == []  # past the pivot: never compensated


async def test_pivot_rejected_compensates_before_it(storage: SqlStorage) -> None:
    sid = _sid()
    with pytest.raises(SagaFailed) as info:
        await SagaOrchestrator(storage).execute(
            _Pivoted(), context={"pivot": "reject", "notify_failures": 0}, saga_id=sid
        )
    assert info.value.status == SagaStatus.COMPENSATED
    assert undone(sid) == ["reserve"]


async def test_pivot_unknown_is_retried_then_parked(storage: SqlStorage) -> None:
    sid = _sid()
    with pytest.raises(SagaFailed) as info:
        await SagaOrchestrator(storage).execute(
            _Pivoted(), context={"pivot": "unknown", "notify_failures": 0}, saga_id=sid
        )
    assert info.value.status == SagaStatus.FAILED
    assert info.value.reason == "pivot_unknown"
    keys = [x for k, s, x in _log(sid) if k == "do" and s == "commit"]
    assert keys == [f"{sid}:commit", f"{sid}:commit"]  # re-invoked with the same key
    assert undone(sid) == []  # it may have committed: not compensated


def _log(sid: str) -> list[tuple[str, str, Any]]:
    from tests.engine.sagas import LOG

    return LOG[sid]


_md = MetaData()
LEDGER = Table(
    "test_ledger",
    _md,
    Column("saga_id", String(255), primary_key=True),
    Column("amount", Integer, nullable=False),
)


class _Transactional(DeclarativeSaga):
    saga_type = "test-transactional"

    @step(transactional=True)
    def book(self, ctx: StepContext) -> dict[str, Any]:
        ctx.connection.execute(LEDGER.insert().values(saga_id=ctx.saga_id, amount=ctx["amount"]))
        if ctx["amount"] < 0:
            raise StepRejected("negative amounts are refused")
        return {"booked": ctx["amount"]}

    @compensate("book")
    async def unbook(self, ctx: StepContext) -> None:
        record(ctx, "undo", ctx.outcome)

    @step(depends_on=["book"])
    async def after(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.get("fail_after"):
            raise StepRejected("later failure")
        return {}


def _ledger(storage: SqlStorage) -> dict[str, int]:
    with storage.engine.connect() as conn:
        return {r.saga_id: r.amount for r in conn.execute(select(LEDGER))}


async def test_transactional_step_commits_with_its_record(storage: SqlStorage) -> None:
    _md.create_all(storage.engine)
    sid = _sid()
    r = await SagaOrchestrator(storage).execute(_Transactional(), {"amount": 7}, saga_id=sid)
    assert r["booked"] == 7
    assert _ledger(storage)[sid] == 7
    with storage.engine.connect() as conn:
        events = (
            conn.execute(text(f"SELECT event_type FROM saga_outbox WHERE saga_id = '{sid}'"))
            .scalars()
            .all()
        )
    assert events == ["book_completed", "after_completed"]


async def test_transactional_step_failure_rolls_back_its_sql(storage: SqlStorage) -> None:
    _md.create_all(storage.engine)
    sid = _sid()
    with pytest.raises(SagaFailed):
        await SagaOrchestrator(storage).execute(_Transactional(), {"amount": -1}, saga_id=sid)
    assert sid not in _ledger(storage)  # the insert was rolled back with the failed step
    state = await SagaOrchestrator(storage).get(sid)
    assert state.steps["book"].status == StepStatus.REJECTED
    assert undone(sid) == []


async def test_transactional_step_is_compensated_after_later_failure(storage: SqlStorage) -> None:
    _md.create_all(storage.engine)
    sid = _sid()
    with pytest.raises(SagaFailed):
        await SagaOrchestrator(storage).execute(
            _Transactional(), {"amount": 3, "fail_after": True}, saga_id=sid
        )
    assert _ledger(storage)[sid] == 3
    assert [x for k, _, x in _log(sid) if k == "undo"] == ["succeeded"]
    assert done(sid) == []


class _Killed(DeclarativeSaga):
    saga_type = "test-transactional-killed"

    @step(transactional=True)
    def book(self, ctx: StepContext) -> dict[str, Any]:
        ctx.connection.execute(LEDGER.insert().values(saga_id=ctx.saga_id, amount=ctx.attempt))
        if ctx.attempt == 1:
            # The database drops this session before the commit: a database failure, not a
            # failure of the step.
            ctx.connection.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return {"booked_on_attempt": ctx.attempt}

    @compensate("book")
    async def unbook(self, ctx: StepContext) -> None:
        record(ctx, "undo")


async def test_transactional_step_cut_by_the_database_is_retried(pg_url: str) -> None:
    # PostgreSQL only: SQLite has no server session that could be terminated.
    from saga_storage import create_storage

    storage = create_storage(pg_url)
    _md.create_all(storage.engine)
    sid = _sid()
    r = await SagaOrchestrator(storage).execute(_Killed(), {}, saga_id=sid)
    assert r["booked_on_attempt"] == 2
    assert _ledger(storage) == {sid: 2}  # attempt 1's row was rolled back with its session
    state = await SagaOrchestrator(storage).get(sid)
    assert state.status == SagaStatus.COMPLETED
    assert state.steps["book"].attempts == 2
    assert undone(sid) == []
    storage.dispose()
