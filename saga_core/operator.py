"""Operator actions on ``FAILED`` sagas: retry them, or resolve them by hand (DESIGN.md 2)."""

from __future__ import annotations

import time
from dataclasses import replace

from saga_core.errors import SagaError
from saga_core.ports import SagaStore
from saga_core.records import Fence, SagaState, SagaWrite, StepState
from saga_core.states import SagaStatus, StepStatus, saga_transition


async def _claim(store: SagaStore, saga_id: str, owner: str) -> tuple[SagaState, Fence]:
    state = await store.load_saga(saga_id)
    if state.status != SagaStatus.FAILED:
        raise SagaError(f"saga {saga_id!r} is {state.status.value}; only FAILED sagas need this")
    fence = await store.claim_saga(saga_id, owner, 30.0)
    if fence is None:
        raise SagaError(f"saga {saga_id!r} is held by {state.lease_owner}; try again later")
    return state, fence


async def retry_saga(store: SagaStore, saga_id: str, *, owner: str = "operator") -> SagaState:
    """Send a ``FAILED`` saga back to a worker.

    After ``compensation_failed`` it compensates again (the failed compensations get fresh
    attempts); after ``forward_stuck``, ``pivot_unknown`` or ``crash_loop`` it goes forward again
    from the step that stopped it (fresh attempts, crash count reset). A worker picks it up.
    """
    state, fence = await _claim(store, saga_id, owner)
    now = time.time()
    rows: list[StepState] = []
    if state.reason == "compensation_failed":
        target = SagaStatus.COMPENSATING
        for r in state.steps.values():
            if r.status == StepStatus.COMPENSATION_FAILED:
                rows.append(replace(r, compensation_attempts=0, finished_at=now))
    else:
        target = SagaStatus.RUNNING
        for r in state.steps.values():
            if r.status in (StepStatus.UNKNOWN, StepStatus.RUNNING):
                # Not an open attempt (finished_at set): the next run starts it afresh.
                rows.append(
                    replace(r, status=StepStatus.RUNNING, attempts=0, crashes=0, finished_at=now)
                )
    saga_transition(state.status, target)
    await store.write(
        fence,
        SagaWrite(
            status=target,
            failed_step=state.failed_step if target == SagaStatus.COMPENSATING else None,
            error=state.error if target == SagaStatus.COMPENSATING else None,
            steps=tuple(rows),
            release_lease=True,
            note=f"retried by {owner}",
        ),
    )
    return await store.load_saga(saga_id)


async def resolve_saga(
    store: SagaStore, saga_id: str, status: SagaStatus, note: str, *, owner: str = "operator"
) -> SagaState:
    """Close a ``FAILED`` saga by hand as ``COMPLETED`` or ``COMPENSATED``, with a note saying
    what the operator did."""
    if status not in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED):
        raise ValueError(f"a saga can be resolved as COMPLETED or COMPENSATED, not {status.value}")
    if not note.strip():
        raise ValueError("resolving a saga by hand needs a note saying what was done")
    state, fence = await _claim(store, saga_id, owner)
    saga_transition(state.status, status)
    await store.write(
        fence,
        SagaWrite(
            status=status,
            reason=state.reason,
            failed_step=state.failed_step,
            error=state.error,
            release_lease=True,
            note=f"resolved by {owner}: {note}",
        ),
    )
    return await store.load_saga(saga_id)
