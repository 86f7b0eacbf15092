"""The compensation phase of a saga run: precedence P, concurrency, retries (DESIGN.md 2)."""

from __future__ import annotations

import time
from dataclasses import replace

import anyio
from anyio.abc import TaskGroup

from saga_core._invoke import ThreadStillRunning, call_user
from saga_core._run_base import (
    RunBase,
    now_iso,
)
from saga_core.context import StepContext
from saga_core.errors import ErrorRecord
from saga_core.events import OutboxEvent
from saga_core.records import SUCCEEDED, UNKNOWN, SagaWrite
from saga_core.states import StepStatus


class CompensationPhase(RunBase):
    """Undoes the affected steps of a failed saga in the order of its precedence ``P``."""

    # --- compensation --------------------------------------------------------------------
    async def _compensate(self, background: TaskGroup | None) -> bool:
        graph = self.definition.graph
        # An attempt that never reported back (its worker died, or the saga was cancelled from
        # another process) may have acted: its outcome is unknown, so it is undone too.
        open_attempts = tuple(
            replace(r, status=self._step_to(r.name, StepStatus.UNKNOWN), outcome=UNKNOWN)
            for r in self.steps.values()
            if r.status == StepStatus.RUNNING
        )
        if open_attempts:
            await self._commit(SagaWrite(steps=open_attempts))
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

    async def _run_compensation(self, name: str, background: TaskGroup | None) -> bool:
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
                    limiter=None if comp.is_async else self.limits.steps,
                    background=background,
                    on_thread=lambda w: None,
                )
            except Exception as exc:
                error = ErrorRecord.from_exception(exc)
                if comp.retry.should_retry(attempt, exc) and not isinstance(
                    exc, ThreadStillRunning
                ):
                    self.steps[name] = replace(row, compensation_error=error)
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
                    "occurred_at": now_iso(),
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
