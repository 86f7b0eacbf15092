"""The forward phase of a saga run: steps start as soon as their dependencies finish."""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from typing import Any

import anyio
from anyio.abc import TaskGroup

from saga_core._invoke import StepTimeout, ThreadStillRunning, ThreadWatch, call_user, step_thread
from saga_core._json import check_json_object
from saga_core._loop_local import cancel_scope
from saga_core._run_base import (
    FORWARD_STUCK,
    PIVOT_UNKNOWN,
    Failure,
    RunBase,
    log,
    now_iso,
)
from saga_core.context import StepContext
from saga_core.definition import StepDefinition
from saga_core.errors import ErrorRecord, LeaseLost, StorageError
from saga_core.events import _checked_event
from saga_core.records import REJECTED, SUCCEEDED, UNKNOWN, SagaWrite, StepState, _replace_step
from saga_core.states import SagaStatus, StepStatus


class ForwardPhase(RunBase):
    """Runs the forward steps of a saga, with retries, timeouts and failure strategies."""

    # --- forward -------------------------------------------------------------------------
    async def _forward(self, background: TaskGroup | None) -> None:
        d = self.definition
        for name in d.order:
            row = self.steps[name]
            if row.status in (StepStatus.REJECTED, StepStatus.UNKNOWN) and self.failure is None:
                # Recovered after the step's failure was recorded but before the saga moved on.
                self.failure = Failure(name, row.error or ErrorRecord("Unknown", "step failed"))
                self.reason = _forward_reason(d.step(name), row.status == StepStatus.REJECTED)
        if self.failure is not None:
            return
        self._started.update(n for n, r in self.steps.items() if r.status == StepStatus.SUCCEEDED)
        # A lone ready step runs in this task; several run as tasks of a group, each starting
        # its successors in it when it succeeds, until none is left. Most sagas are chains, and
        # a task group and a task per step cost more than a step's own bookkeeping. (Methods,
        # not closures: closures calling each other form a reference cycle, which only the
        # garbage collector frees, costly with thousands of sagas in flight.)
        while ready := self._take_ready():
            if len(ready) == 1:  # nothing else is in flight here: no task, no group
                name = ready[0]
                ok = await self._run_step(d.step(name), background)
                self._step_done(None, background, name, ok)
                continue
            async with anyio.create_task_group() as tg:
                for name in ready:
                    tg.start_soon(self._step_task, tg, background, name)

    def _take_ready(self) -> list[str]:
        """The steps to start now (all dependencies succeeded), counted as in flight."""
        started, d = self._started, self.definition
        # Steps whose attempt was recorded with a predecessor's success are in flight
        # already: they run whatever happened since.
        ready = [s for s in self._prestarted if s not in started]
        if self.failure is None and not self._cancel_requested:
            steps, prestarted = self.steps, self._prestarted
            for s in d.order:  # a plain loop: nested generators cost more than the test
                if s in started or s in prestarted:
                    continue
                for dep in d.step(s).depends_on:
                    if steps[dep].status != StepStatus.SUCCEEDED:
                        break
                else:
                    ready.append(s)
        started.update(ready)
        self._in_flight += len(ready)
        return ready

    async def _step_task(self, tg: TaskGroup, background: TaskGroup | None, name: str) -> None:
        ok = await self._run_step(self.definition.step(name), background)
        self._step_done(tg, background, name, ok)

    def _step_done(
        self, tg: TaskGroup | None, background: TaskGroup | None, name: str, ok: bool
    ) -> None:
        """After step ``name`` ended: stop its siblings under fail_fast if it failed, else start
        in ``tg`` what it unblocked (a lone step's caller takes the next ones itself)."""
        self._in_flight -= 1
        if not ok:
            if self.saga.fail_fast:
                self._stop_steps(keep=name)
        elif tg is not None:
            for s in self._take_ready():
                tg.start_soon(self._step_task, tg, background, s)

    async def _run_step(self, sd: StepDefinition, background: TaskGroup | None) -> bool:
        """Run one step with its retries; True if it succeeded."""
        name = sd.name
        attempt = self.steps[name].attempts
        last_error: ErrorRecord | None = self.steps[name].error
        while True:
            prestarted = self._prestarted.pop(name, None)
            if prestarted is not None:
                # Its attempt was recorded with the success of the step it waited for.
                row, attempt = prestarted, prestarted.attempts
            else:
                if self._stop.is_set():
                    # Stopped (fail_fast or cancel) before this attempt began: it never runs.
                    return False
                attempt += 1
                row = self._open_attempt(name, attempt, last_error)
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
            interrupted = False
            with cancel_scope() as scope:
                self._scopes[name] = scope
                if self._stop.is_set():  # stopped while the attempt was being recorded
                    scope.cancel()
                try:
                    if sd.transactional:
                        try:
                            return await self._run_transactional(sd, ctx, row)
                        except _Interrupted:
                            interrupted = True
                    else:
                        result = await call_user(
                            getattr(self.saga, sd.attr),
                            ctx,
                            is_async=sd.is_async,
                            timeout=sd.timeout,
                            what=f"step {name!r}",
                            # Only a thread needs it (reading it costs a RunVar lookup).
                            limiter=None if sd.is_async else self.limits.steps,
                            background=background,
                            # Not a lambda: closing over ``name`` puts cells in this frame.
                            on_thread=functools.partial(self.threads.__setitem__, name),
                        )
                except LeaseLost:
                    self._lose()
                    raise
                except Exception as e:
                    exc = e
                finally:
                    del self._scopes[name]
            if interrupted and not scope.cancelled_caught:
                # Rolled back by a database failure: not a failure of the step. The next
                # attempt's record waits (retrying) until the database is back.
                await anyio.sleep(0.1)
                continue
            if scope.cancelled_caught:
                exc = StepTimeout(f"step {name!r} was cancelled (fail_fast or saga cancel)")
            # A sync step given up on (timeout or cancellation) still runs in its thread.
            given_up = isinstance(exc, ThreadStillRunning) or (
                scope.cancelled_caught and not sd.is_async and not sd.transactional
            )
            unstorable = False
            if exc is None:
                try:
                    done = await self._record_success(sd, row, result)
                    self._settle_thread(name, background, given_up=False)
                    return done
                except TypeError as bad:  # the effect happened but cannot be stored
                    exc, unstorable = bad, True
            last_error = ErrorRecord.from_exception(exc)
            # Whatever the step declares, it did act when it returned (section 2): unknown.
            clean = sd.is_clean_failure(exc) and not isinstance(exc, StepTimeout) and not unstorable
            retry_ok = (
                not clean
                and not given_up
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
                    self._released = True  # the write let the lease go: not a lost lease
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
            recorded = await self._record_failure(sd, row, exc, last_error, clean)
            self._settle_thread(name, background, given_up=given_up)
            return recorded

    async def _run_transactional(
        self, sd: StepDefinition, ctx: StepContext, row: StepState
    ) -> bool:
        fn = getattr(self.saga, sd.attr)

        def action(conn: Any) -> Any:
            ctx.connection = conn
            with step_thread():
                return fn(ctx)

        writes: list[SagaWrite] = []

        def finish(result: Any) -> SagaWrite:
            writes.append(self._success_write(sd, row, result))
            return writes[-1]

        # Runs in the storage's thread: the user's SQL and the step record commit together.
        # A database failure rolled both back (nothing happened), so it is no step failure:
        # a new attempt is made (recorded first, as always), unless the commit went through
        # and only its acknowledgement was lost.
        try:
            await self.store.write_transactional(self.fence, action, finish, sd.timeout)
        except StorageError as exc:
            log.warning("saga %s: step %s: database failed (%s)", self.saga_id, sd.name, exc)
            if await self._already_committed(sd.name, row.attempts):
                return True
            raise _Interrupted from exc
        self._apply_success(sd.name, writes[-1])
        return True

    async def _already_committed(self, name: str, attempt: int) -> bool:
        """Whether this attempt's record is stored (its commit's acknowledgement was lost)."""
        try:
            stored = (await self.store.load_saga(self.saga_id)).steps[name]
        except StorageError:
            return False
        if stored.status == StepStatus.SUCCEEDED and stored.attempts == attempt:
            self.steps[name] = stored
            self._trace("step_succeeded", "  step {step} succeeded", step=name)
            return True
        return False

    def _success_write(
        self,
        sd: StepDefinition,
        row: StepState,
        result: Any,
        opened: tuple[StepState, ...] = (),
        complete: bool = False,
    ) -> SagaWrite:
        """The step's success with its event; with the first attempts ``opened`` of the steps
        it unblocks, and with ``complete``, the saga's completion (releasing the lease)."""
        value = {} if result is None else check_json_object(result, f"result of step {sd.name!r}")
        done = _replace_step(
            row,
            status=self._step_to(row.name, StepStatus.SUCCEEDED),
            outcome=SUCCEEDED,
            result=value,
            error=None,
            finished_at=time.time(),
        )
        # Every part checked already (the definition at import, the id at begin, the result
        # just above): the event is built without checking them again.
        event = _checked_event(
            sd.aggregate_type,
            sd.event_type,
            sd.topic,
            self.saga_id,
            {"saga_id": self.saga_id, "step": sd.name, "result": value, "occurred_at": now_iso()},
        )
        return SagaWrite(
            steps=(done, *opened),
            events=(event,),
            status=self._to(SagaStatus.COMPLETED) if complete else None,
            release_lease=complete,
        )

    def _apply_success(self, name: str, write: SagaWrite) -> None:
        self.steps[name] = write.steps[0]
        self._trace("step_succeeded", "  step {step} succeeded", step=name)

    def _open_attempt(self, name: str, attempt: int, error: ErrorRecord | None) -> StepState:
        """The row recorded before an attempt runs (``attempt + 1`` persisted first)."""
        return self._step(
            name,
            status=StepStatus.RUNNING,
            attempts=attempt,
            error=error,
            started_at=time.time(),
            finished_at=None,
        )

    async def _record_success(self, sd: StepDefinition, row: StepState, result: Any) -> bool:
        """Record the success, and in the same transaction the first attempt of every step it
        unblocks, or, for the saga's last step, its completion: fewer commits per saga."""
        # Plain loops, no generator expressions: closures over locals would keep cells in
        # this frame for as long as the commit takes.
        ready = self._unblocked_by(sd.name)
        steps = self.steps
        opened_rows: list[StepState] = []
        for n in ready:
            opened_rows.append(self._open_attempt(n, steps[n].attempts + 1, steps[n].error))
        opened = tuple(opened_rows)
        last = not ready and self._in_flight == 1 and self.status == SagaStatus.RUNNING
        if last:
            for n, r in steps.items():
                if n != sd.name and r.status != StepStatus.SUCCEEDED:
                    last = False
                    break
        write = self._success_write(sd, row, result, opened, complete=last)
        await self._commit(write, update_rows=False)
        self._apply_success(sd.name, write)
        for r in opened:
            self.steps[r.name] = r
            self._prestarted[r.name] = r
        if last:
            self._completed_inline = True
            self._released = True
        return True

    def _unblocked_by(self, name: str) -> list[str]:
        """Steps that may start once ``name`` succeeds (none after a failure or a stop)."""
        if (
            self.saga.fail_fast
            or self.failure is not None
            or self._cancel_requested
            or self._stop.is_set()
        ):
            return []
        d, steps, started, prestarted = self.definition, self.steps, self._started, self._prestarted
        ready: list[str] = []
        for s in d.dependents[name]:  # plain loops: see _record_success
            if s in started or s in prestarted:
                continue
            for dep in d.step(s).depends_on:
                if dep != name and steps[dep].status != StepStatus.SUCCEEDED:
                    break
            else:
                ready.append(s)
        return ready

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
            self.failure = Failure(sd.name, error, exc)
            self.reason = _forward_reason(sd, clean)
        return False

    def _settle_thread(self, name: str, background: TaskGroup | None, *, given_up: bool) -> None:
        """After a step's outcome is recorded: if its thread was given up on, record what it
        really did once it returns. Its compensation waits for ``late_recorded``."""
        watch = self.threads.get(name)
        if watch is None or watch.late_recorded.is_set():
            return
        if not given_up:
            watch.late_recorded.set()
            return
        assert background is not None  # a run whose steps use threads has its task group
        background.start_soon(self._record_late, name, watch)

    async def _record_late(self, name: str, watch: ThreadWatch) -> None:
        # Started only after the UNKNOWN row was written, so this write lands after it.
        try:
            await watch.done.wait()
            with anyio.CancelScope(shield=True):
                row = self.steps[name]
                late = (
                    replace(row, error=ErrorRecord.from_exception(watch.error))
                    if watch.error is not None
                    else replace(row, result=_late_result(watch.result))
                )
                await self._commit(SagaWrite(steps=(late,)))
                self._trace(
                    "step_late", "  step {step} thread finished late; outcome recorded", step=name
                )
        except LeaseLost:
            pass  # another worker owns the saga now; it will compensate what is unknown
        finally:
            watch.late_recorded.set()


class _Interrupted(Exception):
    """A transactional step's transaction was rolled back by a database failure."""


def _forward_reason(sd: StepDefinition, clean: bool) -> str | None:
    """Why a forward failure parks the saga instead of compensating it (None: compensate)."""
    if sd.kind == "retriable":
        return FORWARD_STUCK
    if sd.kind == "pivot" and not clean:
        return PIVOT_UNKNOWN
    return None


def _late_result(value: Any) -> Any:
    try:
        return {} if value is None else check_json_object(value, "late result")
    except TypeError as exc:
        return {"unstorable_result": str(exc)}
