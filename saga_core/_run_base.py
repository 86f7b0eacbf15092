"""State and storage plumbing shared by the phases of a saga run (see ``_run``)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import anyio
from anyio.abc import TaskGroup

from saga_core._invoke import ThreadWatch
from saga_core._json import copy_json
from saga_core._loop_local import LoopLocal, new_event
from saga_core.definition import DeclarativeSaga, SagaDefinition
from saga_core.errors import ErrorRecord, LeaseLost, StorageError
from saga_core.outbox import OptimisticPublisher
from saga_core.ports import SagaStore
from saga_core.records import Fence, SagaState, SagaWrite, StepState, _replace_step
from saga_core.states import SagaStatus, StepStatus, saga_transition, step_transition

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
        self._steps = LoopLocal(
            f"saga_steps_{id(self)}", functools.partial(anyio.CapacityLimiter, step_threads)
        )

    @property
    def steps(self) -> anyio.CapacityLimiter:
        """Limits sync steps and compensations running in worker threads."""
        return self._steps.get()


@dataclass
class Failure:
    step: str | None
    error: ErrorRecord
    cause: BaseException | None = None


@dataclass
class RunOutcome:
    """How a run ended, for ``execute()`` and ``result()``."""

    state: SagaState
    failure_cause: BaseException | None = None
    compensation_errors: dict[str, ErrorRecord] = field(default_factory=dict)


class Flag:
    """A one-way event that costs one object until someone waits for it.

    Every run has two (``done``, the stop request); few are ever waited for. An anyio event
    is three objects the garbage collector must walk, times thousands of runs in flight.
    """

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: anyio.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        """Return once set (a checkpoint even if it already is, as ``anyio.Event.wait``)."""
        if self._set:
            await anyio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = new_event()
        await self._event.wait()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class RunBase:
    """Execution state of one saga instance and the fenced writes that persist it."""

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
        publisher: OptimisticPublisher | None = None,
        prestarted: tuple[str, ...] = (),
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
        self.failure: Failure | None = (
            Failure(state.failed_step, state.error) if state.error is not None else None
        )
        self.reason: str | None = state.reason
        self.threads: dict[str, ThreadWatch] = {}
        self.comp_errors: dict[str, ErrorRecord] = {}
        self.done = Flag()
        self.outcome: RunOutcome | None = None
        self.lease_seconds = lease_seconds
        self.max_crashes = max_crashes
        # Retry waits at least this long release the lease and end the run (worker mode); a
        # worker resumes the saga at its wake time. None: always wait in-process.
        self.suspend_after = suspend_after
        # Publishes a step's event right after its commit (optimistic path), in the background.
        self.publisher = publisher
        self._background: TaskGroup | None = None
        #: The lease was lost (another worker owns the saga now): this run wrote nothing more.
        self.lost = False
        #: The run released the lease to wait for a retry (resumed later by a worker).
        self.suspended = False
        self._work_scope: anyio.CancelScope | None = None
        self._shield_scope: anyio.CancelScope | None = None
        self._released = False
        # Steps that may start (all dependencies done) and that the forward phase started.
        self._started: set[str] = set()
        # Steps whose first attempt was recorded with their last dependency's success.
        self._prestarted: dict[str, StepState] = {n: self.steps[n] for n in prestarted}
        # The last step's success already recorded the saga COMPLETED.
        self._completed_inline = False
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._in_flight = 0
        self._cancel_requested = False
        # Set to stop steps from retrying: on cancel(), or when a step fails under fail_fast.
        self._stop = Flag()

    def _lose(self) -> None:
        """Stop acting for this saga: another worker may own it now."""
        if self._released or self.lost:
            return  # finished (the final write let the lease go), or already stopped
        self.lost = True
        log.warning("saga %s: lease lost; stopping its work in this process", self.saga_id)
        for scope in (self._work_scope, self._shield_scope):
            if scope is not None:
                scope.cancel()

    def _stop_steps(self, keep: str | None = None) -> None:
        self._stop.set()
        for name, scope in self._scopes.items():
            if name != keep:
                scope.cancel()

    # --- state and storage ---------------------------------------------------------------
    def _forward_context(self, name: str) -> dict[str, Any]:
        data = dict(self.input)
        for dep in self.definition.ancestors[name]:
            data.update(self.steps[dep].result or {})
        copied: dict[str, Any] = copy_json(data)  # the step may change it
        return copied

    def _compensation_context(self) -> dict[str, Any]:
        data = dict(self.input)
        for s in self.definition.order:
            r = self.steps[s]
            if isinstance(r.result, Mapping):
                data.update(r.result)
        copied: dict[str, Any] = copy_json(data)  # the step may change it
        return copied

    def _to(self, status: SagaStatus) -> SagaStatus:
        return saga_transition(self.status, status)

    def _step_to(self, name: str, status: StepStatus) -> StepStatus:
        return step_transition(self.steps[name].status, status)

    def _step(self, name: str, *, status: StepStatus, **changes: Any) -> StepState:
        return _replace_step(self.steps[name], status=self._step_to(name, status), **changes)

    async def _commit(self, write: SagaWrite, *, update_rows: bool = True) -> None:
        """Persist ``write``, retrying database failures with the same payload.

        A write that fails for a database reason never turns into a step failure: the effect
        exists, so the record must be made. ``LeaseLost`` is not retried.
        """
        delay = 0.05
        deadline = time.monotonic() + 30.0
        while True:
            if self.lost:  # the lease is gone: retrying could never succeed
                raise LeaseLost(self.saga_id)
            try:
                claims = await self.store.write(
                    self.fence, write, claim_events=self.publisher is not None
                )
                if claims and self.publisher is not None and self._background is not None:
                    self._background.start_soon(
                        functools.partial(self.publisher.publish, claims, committed=True)
                    )
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
