"""Executing one saga instance: forward steps, then compensation if needed (DESIGN.md 2 and 3).

All execution state of a saga lives in its ``SagaRun``; an orchestrator running many sagas shares
nothing mutable between them. Every transition is written through the fenced store before the
run acts on it, so a crash at any point leaves a record that recovery can continue from.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.lowlevel import RunVar

from saga_core._invoke import StepTimeout, ThreadStillRunning, ThreadWatch, call_user
from saga_core._json import check_json_object
from saga_core.context import StepContext
from saga_core.definition import DeclarativeSaga, SagaDefinition, StepDefinition
from saga_core.errors import ErrorRecord, LeaseLost, StorageError
from saga_core.events import OutboxEvent
from saga_core.ports import SagaStore
from saga_core.records import REJECTED, SUCCEEDED, UNKNOWN, Fence, SagaState, SagaWrite, StepState
from saga_core.states import SagaStatus, StepStatus, saga_transition, step_transition

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("saga")

COMPENSATION_FAILED = "compensation_failed"
FORWARD_STUCK = "forward_stuck"
PIVOT_UNKNOWN = "pivot_unknown"
CRASH_LOOP = "crash_loop"

CANCELLED = ErrorRecord("Cancelled", "saga cancelled")


class Limits:
    """Thread limiters of one orchestrator (never anyio's shared default), one set per event
    loop, since an orchestrator may be used from several ``anyio.run`` calls in turn."""

    def __init__(self, step_threads: int) -> None:
        self._step_threads = step_threads
        self._steps: RunVar[anyio.CapacityLimiter] = RunVar(f"saga_steps_{id(self)}")

    @property
    def steps(self) -> anyio.CapacityLimiter:
        """Limits sync steps and compensations running in worker threads."""
        try:
            return self._steps.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(self._step_threads)
            self._steps.set(limiter)
            return limiter


@dataclass
class _Failure:
    step: str | None
    error: ErrorRecord
    cause: BaseException | None = None


@dataclass
class RunOutcome:
    """How a run ended, for ``execute()`` and ``result()``."""

    state: SagaState
    failure_cause: BaseException | None = None
    compensation_errors: dict[str, ErrorRecord] = field(default_factory=dict)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class SagaRun:
    """One saga instance being executed by this process under a lease (``fence``)."""

    def __init__(
        self,
        *,
        store: SagaStore,
        definition: SagaDefinition,
        saga: DeclarativeSaga,
        state: SagaState,
        fence: Fence,
        limits: Limits,
        lease_seconds: float = 60.0,
        max_crashes: int = 5,
        suspend_after: float | None = None,
    ) -> None:
        self.store = store
        self.definition = definition
        self.saga = saga
        self.fence = fence
        self.limits = limits
        self.saga_id = state.saga_id
        self.input = dict(state.input)
        self.status = state.status
        self.steps: dict[str, StepState] = dict(state.steps)
        self.failure: _Failure | None = (
            _Failure(state.failed_step, state.error) if state.error is not None else None
        )
        self.reason: str | None = state.reason
        self.threads: dict[str, ThreadWatch] = {}
        self.comp_errors: dict[str, ErrorRecord] = {}
        self.done = anyio.Event()
        self.outcome: RunOutcome | None = None
        self.lease_seconds = lease_seconds
        self.max_crashes = max_crashes
        # Retry waits at least this long release the lease and end the run (worker mode); a
        # worker resumes the saga at its wake time. None: always wait in-process.
        self.suspend_after = suspend_after
        #: The lease was lost (another worker owns the saga now): this run wrote nothing more.
        self.lost = False
        #: The run released the lease to wait for a retry (resumed later by a worker).
        self.suspended = False
        self._work_scope: anyio.CancelScope | None = None
        self._shield_scope: anyio.CancelScope | None = None
        self._finishing = False
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._in_flight = 0
        self._cancel_requested = False
        # Set to stop steps from retrying: on cancel(), or when a step fails under fail_fast.
        self._stop = anyio.Event()

    # --- public --------------------------------------------------------------------------
    async def run(self) -> RunOutcome:
        """Drive the saga to a final (or FAILED) status, or until the lease is lost or the run
        suspends itself to wait for a retry."""
        try:
            async with anyio.create_task_group() as keeper:
                keeper.start_soon(self._keep_lease)
                try:
                    with anyio.CancelScope() as self._work_scope:
                        async with anyio.create_task_group() as background:
                            await self._drive(background)
                except BaseException as exc:
                    if not ((self.lost or self.suspended) and _only(exc, LeaseLost)):
                        raise
                finally:
                    keeper.cancel_scope.cancel()
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

    def _lose(self) -> None:
        """Stop acting for this saga: another worker may own it now."""
        if self._finishing and not self.lost:
            return
        self.lost = True
        log.warning("saga %s: lease lost; stopping its work in this process", self.saga_id)
        for scope in (self._work_scope, self._shield_scope):
            if scope is not None:
                scope.cancel()

    async def _keep_lease(self) -> None:
        """Renew the lease every third of its length; stop acting once it cannot be trusted.

        Without a successful renewal by ``lease_until - margin`` (measured on the monotonic
        clock from the last success), the run stops even if the database is unreachable: a
        worker that cannot renew must assume another one takes over.
        """
        margin = self.lease_seconds / 4
        trusted_until = time.monotonic() + self.lease_seconds - margin
        while True:
            await anyio.sleep(
                min(self.lease_seconds / 3, max(0.01, trusted_until - time.monotonic()))
            )
            started = time.monotonic()
            try:
                held = await self.store.renew_leases(
                    self.fence.owner, [self.fence], self.lease_seconds
                )
            except StorageError as exc:
                if time.monotonic() >= trusted_until:
                    log.warning("saga %s: cannot renew lease (%s)", self.saga_id, exc)
                    self._lose()
                    return
                continue
            if self.fence.saga_id not in held:
                self._lose()
                return
            trusted_until = started + self.lease_seconds - margin

    def cancel(self) -> None:
        """Stop starting steps, cancel the ones in flight, and compensate."""
        self._cancel_requested = True
        self._stop_steps()

    def _stop_steps(self, keep: str | None = None) -> None:
        self._stop.set()
        for name, scope in self._scopes.items():
            if name != keep:
                scope.cancel()

    # --- phases --------------------------------------------------------------------------
    async def _drive(self, background: TaskGroup) -> None:
        if await self._count_crashes():
            return
        if self.status == SagaStatus.PENDING:
            await self._commit(SagaWrite(status=self._to(SagaStatus.RUNNING)))
        if self.status == SagaStatus.RUNNING:
            self._trace("saga_started", "saga {saga} running")
            await self._forward(background)
            if self._cancel_requested and self.failure is None:
                self.failure = _Failure(None, CANCELLED)
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
        open_rows = [
            replace(r, crashes=r.crashes + 1)
            for r in self.steps.values()
            if r.status in (StepStatus.RUNNING, StepStatus.COMPENSATING)
            and r.finished_at is None
            and r.started_at is not None
        ]
        if not open_rows:
            return False
        looping = [r for r in open_rows if r.crashes >= self.max_crashes]
        if looping and self.status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
            r = looping[0]
            self.failure = _Failure(
                r.name,
                ErrorRecord("CrashLoop", f"step {r.name!r} crashed its worker {r.crashes} times"),
            )
            await self._commit(SagaWrite(steps=tuple(open_rows)))
            await self._finish(SagaStatus.FAILED, CRASH_LOOP)
            return True
        await self._commit(SagaWrite(steps=tuple(open_rows)))
        return False

    async def _finish(self, status: SagaStatus, reason: str | None = None) -> None:
        self._finishing = True
        f = self.failure
        await self._commit(
            SagaWrite(
                status=self._to(status),
                reason=reason,
                failed_step=f.step if f else None,
                error=f.error if f else None,
                release_lease=True,
            )
        )
        self.reason = reason
        self._trace(
            "saga_finished", "saga {saga} " + status.value + (f" ({reason})" if reason else "")
        )
        self.outcome = RunOutcome(self._snapshot(), f.cause if f else None, dict(self.comp_errors))

    # --- forward -------------------------------------------------------------------------
    async def _forward(self, background: TaskGroup) -> None:
        d = self.definition
        for name in d.order:
            row = self.steps[name]
            if row.status in (StepStatus.REJECTED, StepStatus.UNKNOWN) and self.failure is None:
                # Recovered after the step's failure was recorded but before the saga moved on.
                self.failure = _Failure(name, row.error or ErrorRecord("Unknown", "step failed"))
                self.reason = _forward_reason(d.step(name), row.status == StepStatus.REJECTED)
        if self.failure is not None:
            return
        started: set[str] = {n for n, r in self.steps.items() if r.status == StepStatus.SUCCEEDED}
        async with anyio.create_task_group() as tg:

            def launch_ready() -> None:
                if self.failure is not None or self._cancel_requested:
                    return
                for s in d.order:
                    if s in started:
                        continue
                    if all(
                        self.steps[dep].status == StepStatus.SUCCEEDED
                        for dep in d.step(s).depends_on
                    ):
                        started.add(s)
                        self._in_flight += 1
                        tg.start_soon(step_task, s)

            async def step_task(name: str) -> None:
                ok = await self._run_step(d.step(name), background)
                self._in_flight -= 1
                if ok:
                    launch_ready()
                elif self.saga.fail_fast:
                    self._stop_steps(keep=name)

            launch_ready()

    async def _run_step(self, sd: StepDefinition, background: TaskGroup) -> bool:
        """Run one step with its retries; True if it succeeded."""
        name = sd.name
        attempt = self.steps[name].attempts
        last_error: ErrorRecord | None = self.steps[name].error
        while True:
            attempt += 1
            row = self._step(
                name,
                status=StepStatus.RUNNING,
                attempts=attempt,
                error=last_error,
                started_at=time.time(),
                finished_at=None,
            )
            await self._commit(SagaWrite(steps=(row,)))
            self._trace(
                "step_started",
                "  step {step} started (attempt {attempt})",
                step=name,
                attempt=attempt,
            )
            ctx = StepContext(
                self._forward_context(name),
                saga_id=self.saga_id,
                step=name,
                attempt=attempt,
                deadline=None if sd.timeout is None else time.monotonic() + sd.timeout,
            )
            exc: BaseException | None = None
            result: Any = None
            with anyio.CancelScope() as scope:
                self._scopes[name] = scope
                try:
                    if sd.transactional:
                        return await self._run_transactional(sd, ctx, row)
                    result = await call_user(
                        getattr(self.saga, sd.attr),
                        ctx,
                        is_async=sd.is_async,
                        timeout=sd.timeout,
                        what=f"step {name!r}",
                        limiter=self.limits.steps,
                        background=background,
                        on_thread=lambda w: self._watch(name, w, background),
                    )
                except LeaseLost:
                    raise
                except Exception as e:
                    exc = e
                finally:
                    del self._scopes[name]
            if scope.cancelled_caught:
                exc = StepTimeout(f"step {name!r} was cancelled (fail_fast or saga cancel)")
            if exc is None:
                try:
                    return await self._record_success(sd, row, result)
                except TypeError as bad:  # the effect happened but cannot be stored: unknown
                    exc = bad
            last_error = ErrorRecord.from_exception(exc)
            clean = sd.is_clean_failure(exc) and not isinstance(exc, StepTimeout)
            retry_ok = (
                not clean
                and not isinstance(exc, ThreadStillRunning)
                and not self._stop.is_set()
                and sd.retry.should_retry(attempt, exc)
            )
            if retry_ok:
                delay = sd.retry.delay(attempt)
                self._trace(
                    "step_retry",
                    "  step {step} failed ({error}); retry in {delay:.2f}s",
                    step=name,
                    error=last_error,
                    delay=delay,
                )
                # The attempt is over: record it, so a crash while waiting is not a crash of
                # the step. A long wait in worker mode frees the lease until the retry is due.
                waiting = replace(row, error=last_error, finished_at=time.time())
                suspend = (
                    self.suspend_after is not None
                    and delay >= self.suspend_after
                    and self._in_flight == 1
                )
                if suspend:
                    self.suspended = True
                    await self._commit(SagaWrite(steps=(waiting,), wake_in=delay))
                    self._trace(
                        "saga_suspended", "saga {saga} waits {delay:.1f}s for a retry", delay=delay
                    )
                    assert self._work_scope is not None
                    self._work_scope.cancel()
                    await anyio.lowlevel.checkpoint()
                await self._commit(SagaWrite(steps=(waiting,)))
                with anyio.move_on_after(delay):
                    await self._stop.wait()
                if not self._stop.is_set():
                    continue
            return await self._record_failure(sd, row, exc, last_error, clean)

    async def _run_transactional(
        self, sd: StepDefinition, ctx: StepContext, row: StepState
    ) -> bool:
        fn = getattr(self.saga, sd.attr)

        def action(conn: Any) -> Any:
            ctx.connection = conn
            return fn(ctx)

        writes: list[SagaWrite] = []

        def finish(result: Any) -> SagaWrite:
            writes.append(self._success_write(sd, row, result))
            return writes[-1]

        # Runs in the storage's thread: the user's SQL and the step record commit together.
        await self.store.write_transactional(self.fence, action, finish, sd.timeout)
        self._apply_success(sd.name, writes[-1])
        return True

    def _success_write(self, sd: StepDefinition, row: StepState, result: Any) -> SagaWrite:
        value = {} if result is None else check_json_object(result, f"result of step {sd.name!r}")
        done = replace(
            row,
            status=self._step_to(row.name, StepStatus.SUCCEEDED),
            outcome=SUCCEEDED,
            result=value,
            error=None,
            finished_at=time.time(),
        )
        event = OutboxEvent(
            aggregate_type=sd.aggregate_type,
            event_type=sd.event_type,
            topic=sd.topic,
            saga_id=self.saga_id,
            payload={
                "saga_id": self.saga_id,
                "step": sd.name,
                "result": value,
                "occurred_at": _now_iso(),
            },
        )
        return SagaWrite(steps=(done,), events=(event,))

    def _apply_success(self, name: str, write: SagaWrite) -> None:
        self.steps[name] = write.steps[0]
        self._trace("step_succeeded", "  step {step} succeeded", step=name)

    async def _record_success(self, sd: StepDefinition, row: StepState, result: Any) -> bool:
        write = self._success_write(sd, row, result)
        await self._commit(write, update_rows=False)
        self._apply_success(sd.name, write)
        return True

    async def _record_failure(
        self,
        sd: StepDefinition,
        row: StepState,
        exc: BaseException,
        error: ErrorRecord,
        clean: bool,
    ) -> bool:
        status = StepStatus.REJECTED if clean else StepStatus.UNKNOWN
        failed = replace(
            row,
            status=self._step_to(sd.name, status),
            outcome=REJECTED if clean else UNKNOWN,
            error=error,
            finished_at=time.time(),
        )
        await self._commit(SagaWrite(steps=(failed,)))
        self._trace(
            "step_failed",
            "  step {step} failed: {error} (" + ("rejected" if clean else "outcome unknown") + ")",
            step=sd.name,
            error=error,
        )
        if self.failure is None and not self._cancel_requested:
            self.failure = _Failure(sd.name, error, exc)
            self.reason = _forward_reason(sd, clean)
        return False

    def _watch(self, name: str, watch: ThreadWatch, background: TaskGroup) -> None:
        """Remember a step's thread; if the step is given up on, record its late outcome."""
        self.threads[name] = watch

        async def record_late() -> None:
            await watch.done.wait()
            row = self.steps[name]
            if row.status != StepStatus.UNKNOWN:
                return  # finished in time: recorded by the step itself
            with anyio.CancelScope(shield=True):
                late = (
                    replace(row, error=ErrorRecord.from_exception(watch.error))
                    if watch.error is not None
                    else replace(row, result=_late_result(watch.result))
                )
                await self._commit(SagaWrite(steps=(late,)))
                self._trace(
                    "step_late", "  step {step} thread finished late; outcome recorded", step=name
                )

        async def late_then_signal() -> None:
            try:
                await record_late()
            finally:
                watch.late_recorded.set()

        background.start_soon(late_then_signal)

    # --- compensation --------------------------------------------------------------------
    async def _compensate(self, background: TaskGroup) -> bool:
        graph = self.definition.graph
        affected = [
            s
            for s in graph.steps
            if s in graph.compensatable and self.steps[s].outcome in (SUCCEEDED, UNKNOWN)
        ]
        finished = {s for s in affected if self.steps[s].status == StepStatus.COMPENSATED}
        running: set[str] = set()
        failed: set[str] = set()
        self._trace(
            "compensation_started",
            "saga {saga} compensating: {steps}",
            steps=", ".join(affected) or "nothing to undo",
        )
        async with anyio.create_task_group() as tg:

            def launch_ready() -> None:
                for s in graph.ready(affected, finished):
                    if s not in running and s not in failed:
                        running.add(s)
                        tg.start_soon(comp_task, s)

            async def comp_task(s: str) -> None:
                ok = await self._run_compensation(s, background)
                running.discard(s)
                if ok:
                    finished.add(s)
                    launch_ready()
                else:
                    failed.add(s)

            launch_ready()
        return not failed and finished >= set(affected)

    async def _run_compensation(self, name: str, background: TaskGroup) -> bool:
        sd = self.definition.step(name)
        comp = sd.compensation
        assert comp is not None
        watch = self.threads.get(name)
        if watch is not None:
            await watch.late_recorded.wait()  # undo only once the forward thread has finished
        attempt = self.steps[name].compensation_attempts
        while True:
            attempt += 1
            row = self._step(
                name,
                status=StepStatus.COMPENSATING,
                compensation_attempts=attempt,
                finished_at=None,
            )
            await self._commit(SagaWrite(steps=(row,)))
            ctx = StepContext(
                self._compensation_context(),
                saga_id=self.saga_id,
                step=name,
                attempt=attempt,
                deadline=None if comp.timeout is None else time.monotonic() + comp.timeout,
                outcome=row.outcome,
            )
            try:
                await call_user(
                    getattr(self.saga, comp.attr),
                    ctx,
                    is_async=comp.is_async,
                    timeout=comp.timeout,
                    what=f"compensation of {name!r}",
                    limiter=self.limits.steps,
                    background=background,
                    on_thread=lambda w: None,
                )
            except Exception as exc:
                error = ErrorRecord.from_exception(exc)
                if comp.retry.should_retry(attempt, exc) and not isinstance(
                    exc, ThreadStillRunning
                ):
                    self._steps_set(replace(row, compensation_error=error))
                    await anyio.sleep(comp.retry.delay(attempt))
                    continue
                bad = replace(
                    row,
                    status=self._step_to(name, StepStatus.COMPENSATION_FAILED),
                    compensation_error=error,
                    finished_at=time.time(),
                )
                await self._commit(SagaWrite(steps=(bad,)))
                self.comp_errors[name] = error
                self._trace(
                    "compensation_failed",
                    "  compensation of {step} failed: {error}",
                    step=name,
                    error=error,
                )
                return False
            done = replace(
                row,
                status=self._step_to(name, StepStatus.COMPENSATED),
                compensation_error=None,
                finished_at=time.time(),
            )
            event = OutboxEvent(
                aggregate_type=sd.aggregate_type,
                event_type=comp.event_type,
                topic=sd.topic,
                saga_id=self.saga_id,
                payload={
                    "saga_id": self.saga_id,
                    "step": name,
                    "outcome": row.outcome,
                    "occurred_at": _now_iso(),
                },
            )
            await self._commit(SagaWrite(steps=(done,), events=(event,)))
            self._trace(
                "compensated",
                "  {comp} undid {step} (its outcome was {outcome})",
                step=name,
                comp=comp.attr,
                outcome=row.outcome,
            )
            return True

    # --- state and storage ---------------------------------------------------------------
    def _forward_context(self, name: str) -> dict[str, Any]:
        data = dict(self.input)
        for dep in self.definition.ancestors[name]:
            data.update(self.steps[dep].result or {})
        return copy.deepcopy(data)

    def _compensation_context(self) -> dict[str, Any]:
        data = dict(self.input)
        for s in self.definition.order:
            r = self.steps[s]
            if isinstance(r.result, Mapping):
                data.update(r.result)
        return copy.deepcopy(data)

    def _to(self, status: SagaStatus) -> SagaStatus:
        return saga_transition(self.status, status)

    def _step_to(self, name: str, status: StepStatus) -> StepStatus:
        return step_transition(self.steps[name].status, status)

    def _step(self, name: str, *, status: StepStatus, **changes: Any) -> StepState:
        return replace(self.steps[name], status=self._step_to(name, status), **changes)

    def _steps_set(self, row: StepState) -> None:
        self.steps[row.name] = row

    async def _commit(self, write: SagaWrite, *, update_rows: bool = True) -> None:
        """Persist ``write``, retrying database failures with the same payload.

        A write that fails for a database reason never turns into a step failure: the effect
        exists, so the record must be made. ``LeaseLost`` is not retried.
        """
        delay = 0.05
        deadline = time.monotonic() + 30.0
        while True:
            try:
                await self.store.write(self.fence, write)
                break
            except LeaseLost:
                self._lose()
                raise
            except StorageError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("saga %s: write failed (%s); retrying", self.saga_id, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if write.status is not None:
            self.status = write.status
        if update_rows:
            for row in write.steps:
                self.steps[row.name] = row

    def _snapshot(self) -> SagaState:
        f = self.failure
        return SagaState(
            saga_id=self.saga_id,
            saga_type=self.definition.saga_type,
            definition_hash=self.definition.version,
            status=self.status,
            input=self.input,
            steps=dict(self.steps),
            reason=self.reason,
            failed_step=f.step if f else None,
            error=f.error if f else None,
        )

    def _trace(self, event: str, template: str, **fields: Any) -> None:
        if log.isEnabledFor(logging.INFO):
            msg = template.format(saga=self.saga_id, **fields)
            log.info(
                msg,
                extra={
                    "saga_event": event,
                    "saga_id": self.saga_id,
                    **{f"saga_{k}": v for k, v in fields.items()},
                },
            )


def _forward_reason(sd: StepDefinition, clean: bool) -> str | None:
    """Why a forward failure parks the saga instead of compensating it (None: compensate)."""
    if sd.kind == "retriable":
        return FORWARD_STUCK
    if sd.kind == "pivot" and not clean:
        return PIVOT_UNKNOWN
    return None


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is ``kind`` or a cancellation, or a group made only of those."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(e, kind) for e in exc.exceptions)
    return isinstance(exc, (kind, anyio.get_cancelled_exc_class()))


def _late_result(value: Any) -> Any:
    try:
        return {} if value is None else check_json_object(value, "late result")
    except TypeError as exc:
        return {"unstorable_result": str(exc)}
