"""Executing one saga instance: forward steps, then compensation if needed (DESIGN.md 2 and 3).

All execution state of a saga lives in its ``SagaRun``; an orchestrator running many sagas shares
nothing mutable between them. Every transition is written through the fenced store before the
run acts on it, so a crash at any point leaves a record that recovery can continue from.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import anyio
from anyio.abc import TaskGroup

from saga_core.errors import ErrorRecord, LeaseLost
from saga_core.records import SagaWrite, StepState
from saga_core.states import SagaStatus, StepStatus

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from saga_core._compensation import CompensationPhase
from saga_core._forward import ForwardPhase
from saga_core._leases import LeaseKeeper
from saga_core._loop_local import cancel_scope
from saga_core._run_base import (
    CANCELLED,
    COMPENSATION_FAILED,
    CRASH_LOOP,
    Failure,
    Limits,
    RunOutcome,
)

__all__ = ["Limits", "RunOutcome", "SagaRun"]


class SagaRun(ForwardPhase, CompensationPhase):
    """One saga instance being executed by this process under a lease (``fence``)."""

    # --- public --------------------------------------------------------------------------
    async def run(self) -> RunOutcome:
        """Drive the saga to a final (or FAILED) status, or until the lease is lost or the run
        suspends itself to wait for a retry."""
        # Renewed by the event loop's lease driver until stopped, after any shielded
        # compensation too; a lost lease calls ``_lose`` (see saga_core._leases).
        lease = LeaseKeeper(self.store, self.fence, self.lease_seconds, on_lost=self._lose)
        try:
            try:
                lease.start()
                if self.publisher is None and not self.definition.uses_threads:
                    # Nothing will run beside the steps (no publish, no worker thread to wait
                    # for): a cancel scope is all the run needs, and thousands of runs at once
                    # each spare a task group (its enter and exit, and its objects).
                    with cancel_scope() as self._work_scope:
                        await self._drive(None)
                else:
                    async with anyio.create_task_group() as background:
                        # The group's own scope is the work scope: one scope less per run.
                        self._work_scope = background.cancel_scope
                        self._background = background
                        await self._drive(background)
            except BaseException as exc:
                if not ((self.lost or self.suspended) and _only(exc, LeaseLost)):
                    inner = _alone(exc)
                    if inner is exc:
                        raise
                    raise inner from inner.__cause__
            finally:
                lease.stop()
        except anyio.get_cancelled_exc_class():
            # The caller stopped waiting: leave the saga as recorded and free the lease so a
            # worker can continue it at once instead of after the lease expires.
            with anyio.CancelScope(shield=True):
                await self.store.release(self.fence)
            raise
        finally:
            self.done.set()
        if self.outcome is None:  # lost or suspended: what is stored is the truth
            self.outcome = RunOutcome(self._snapshot())
        return self.outcome

    def cancel(self) -> None:
        """Stop starting steps, cancel the ones in flight, and compensate."""
        self._cancel_requested = True
        self._stop_steps()

    # --- phases --------------------------------------------------------------------------
    async def _drive(self, background: TaskGroup | None) -> None:
        if await self._count_crashes():
            return
        if self.status == SagaStatus.PENDING:
            await self._commit(SagaWrite(status=self._to(SagaStatus.RUNNING)))
        if self.status == SagaStatus.RUNNING:
            self._trace("saga_started", "saga {saga} running")
            await self._forward(background)
            if self._cancel_requested and self.failure is None:
                self.failure = Failure(None, CANCELLED)
            if self.failure is None:
                await self._finish(SagaStatus.COMPLETED)
                return
            if self.reason is not None:  # forward stuck after the pivot: not compensated
                await self._finish(SagaStatus.FAILED, self.reason)
                return
            f = self.failure
            await self._commit(
                SagaWrite(
                    status=self._to(SagaStatus.COMPENSATING),
                    failed_step=f.step,
                    error=f.error,
                )
            )
        if self.status == SagaStatus.COMPENSATING:
            # Shielded: once compensation starts, cancelling the caller must not stop it halfway.
            with anyio.CancelScope(shield=True) as self._shield_scope:
                ok = await self._compensate(background)
                await self._finish(
                    SagaStatus.COMPENSATED if ok else SagaStatus.FAILED,
                    None if ok else COMPENSATION_FAILED,
                )
                return
        # Nothing to do (e.g. FAILED and not retried): report as it is.
        self.outcome = RunOutcome(await self.store.load_saga(self.saga_id))

    async def _count_crashes(self) -> bool:
        """Count attempts that never reported back; park the saga if one keeps crashing.

        An attempt row still open (started, never finished) when a run begins means the worker
        that ran it died or lost its lease. Returns True if the saga was parked.
        """
        open_rows: list[StepState] = []
        for r in self.steps.values():
            if (
                (r.status == StepStatus.RUNNING or r.status == StepStatus.COMPENSATING)
                and r.finished_at is None
                and r.started_at is not None
                and r.name not in self._prestarted  # opened by this very run
            ):
                open_rows.append(replace(r, crashes=r.crashes + 1))
        if not open_rows:
            return False
        looping = [r for r in open_rows if r.crashes >= self.max_crashes]
        if looping and self.status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
            r = looping[0]
            self.failure = Failure(
                r.name,
                ErrorRecord("CrashLoop", f"step {r.name!r} crashed its worker {r.crashes} times"),
            )
            await self._commit(SagaWrite(steps=tuple(open_rows)))
            await self._finish(SagaStatus.FAILED, CRASH_LOOP)
            return True
        await self._commit(SagaWrite(steps=tuple(open_rows)))
        return False

    async def _finish(self, status: SagaStatus, reason: str | None = None) -> None:
        f = self.failure
        if not (status == SagaStatus.COMPLETED and self._completed_inline):
            await self._commit(
                SagaWrite(
                    status=self._to(status),
                    reason=reason,
                    failed_step=f.step if f else None,
                    error=f.error if f else None,
                    release_lease=True,
                )
            )
        self._released = True
        self.reason = reason
        self._trace(
            "saga_finished",
            "saga {saga} {status}" + (" ({reason})" if reason else ""),
            status=status.value,
            reason=reason,
        )
        self.outcome = RunOutcome(self._snapshot(), f.cause if f else None, dict(self.comp_errors))


def _alone(exc: BaseException) -> BaseException:
    """The one exception a run's task group wrapped (its background tasks never raise), so
    that a run ends with the same error with or without a group; anything else as it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is ``kind`` or a cancellation, or a group made only of those."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(e, kind) for e in exc.exceptions)
    return isinstance(exc, (kind, anyio.get_cancelled_exc_class()))
