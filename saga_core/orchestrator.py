"""``SagaOrchestrator``: the async API that starts, runs, waits for and cancels sagas."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from saga_core._ids import new_uuid4
from saga_core._json import check_json_object
from saga_core._run import Limits, RunOutcome, SagaRun
from saga_core._text import text_problem
from saga_core.definition import DeclarativeSaga, SagaDefinition, registered_saga
from saga_core.errors import SagaDefinitionError, SagaError, SagaFailed
from saga_core.outbox import OptimisticPublisher, OutboxWorker
from saga_core.ports import Broker, OutboxStore, SagaStore
from saga_core.records import Fence, NewSaga, SagaState
from saga_core.states import SagaStatus, StepStatus

log = logging.getLogger("saga")


class SagaResult(dict[str, Any]):
    """A completed saga's data: the input merged with every step's result (in topological order,
    ties by declaration order), plus ``saga_id`` and ``results`` (per step)."""

    def __init__(
        self, data: Mapping[str, Any], *, saga_id: str, results: Mapping[str, Any]
    ) -> None:
        super().__init__(data)
        self.saga_id = saga_id
        self.results: dict[str, Any] = dict(results)


def _definition_of(
    saga: DeclarativeSaga | type[DeclarativeSaga],
) -> tuple[DeclarativeSaga, SagaDefinition]:
    instance = saga() if isinstance(saga, type) else saga
    if not isinstance(instance, DeclarativeSaga):
        raise TypeError(f"expected a DeclarativeSaga, got {type(instance).__name__}")
    return instance, type(instance).definition()


def _result_of(state: SagaState, definition: SagaDefinition | None = None) -> SagaResult:
    if definition is None:
        # Merge in the same topological order execute() uses, when this process has the code.
        try:
            known = registered_saga(state.saga_type).definition()
        except LookupError:
            known = None
        if known is not None and known.version == state.definition_hash:
            definition = known
    data = dict(state.input)
    order = definition.order if definition is not None else tuple(state.steps)
    results = {}
    for name in order:
        r = state.steps[name].result
        results[name] = r
        if isinstance(r, Mapping):
            data.update(r)
    return SagaResult(data, saga_id=state.saga_id, results=results)


def _failed_of(outcome: RunOutcome | None, state: SagaState) -> SagaFailed:
    comp_errors = {
        n: s.compensation_error
        for n, s in state.steps.items()
        if s.status == StepStatus.COMPENSATION_FAILED and s.compensation_error is not None
    }
    return SagaFailed(
        state.saga_id,
        state.status,
        state.failed_step,
        state.error,
        cause=outcome.failure_cause if outcome else None,
        compensation_errors=comp_errors,
        reason=state.reason,
    )


_SETTLED = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)


class SagaOrchestrator:
    """Runs sagas against a storage, under asyncio or trio (anyio only).

    One orchestrator runs any number of sagas concurrently; each saga's execution state belongs
    to that saga alone. Use ``async with SagaOrchestrator(...)`` to let it run sagas in the
    background (``start()``), relay the outbox to ``broker`` while open, and keep ``execute()``
    running a saga even when its caller stops waiting.

    Args:
        storage: a storage from ``create_storage``.
        broker: where the outbox is relayed while the orchestrator is open (optional).
        owner: the lease owner name of this process (default: host, pid and a random part).
        lease_seconds: how long a lease lasts without renewal.
        step_threads: how many sync steps and compensations run at once in worker threads.
        optimistic: with a broker, publish each step's event right after its commit when that
            cannot reorder its key (``OptimisticPublisher``); the relay sends the rest.
    """

    def __init__(
        self,
        storage: Any,
        broker: Broker | None = None,
        *,
        owner: str | None = None,
        lease_seconds: float = 60.0,
        step_threads: int = 32,
        optimistic: bool = True,
    ) -> None:
        if not isinstance(storage, SagaStore):
            raise TypeError(f"storage must implement SagaStore, got {type(storage).__name__}")
        self.storage: SagaStore = storage
        self.broker = broker
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_seconds = lease_seconds
        self._limits = Limits(step_threads)
        self._publisher = (
            OptimisticPublisher(storage, broker)
            if optimistic and broker is not None and isinstance(storage, OutboxStore)
            else None
        )
        self._runs: dict[str, SagaRun] = {}
        self._tg: TaskGroup | None = None
        self._tg_cm: Any = None

    # --- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> SagaOrchestrator:
        if self._tg is not None:
            raise RuntimeError("this SagaOrchestrator is already open")
        self._tg_cm = anyio.create_task_group()
        self._tg = await self._tg_cm.__aenter__()
        if self.broker is not None and isinstance(self.storage, OutboxStore):
            self._tg.start_soon(OutboxWorker(self.storage, self.broker).run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Wait for sagas running in the background, then stop the relay."""
        assert self._tg is not None
        try:
            with anyio.CancelScope(shield=exc_type is None):
                for run in list(self._runs.values()):
                    await run.done.wait()
            self._tg.cancel_scope.cancel()
        finally:
            tg_cm, self._tg, self._tg_cm = self._tg_cm, None, None
            result: bool | None = await tg_cm.__aexit__(exc_type, exc, tb)
        return result

    # --- running sagas -------------------------------------------------------------------
    async def execute(
        self,
        saga: DeclarativeSaga | type[DeclarativeSaga],
        context: Mapping[str, Any] | None = None,
        saga_id: str | None = None,
    ) -> SagaResult:
        """Run a saga to its end and return its merged data, or raise ``SagaFailed``.

        ``context`` (the input) must be JSON-serialisable: a ``TypeError`` naming the bad key is
        raised before anything is written. With an existing ``saga_id`` and the same input, waits
        for that saga instead of starting another (``SagaConflict`` if the input differs).
        """
        instance, definition = _definition_of(saga)
        sid, run = await self._begin(instance, definition, context, saga_id, leased=True)
        if run is None:
            return await self.result(sid)
        if self._tg is not None:
            # Open orchestrator: the saga runs in our task group, so a cancelled caller only
            # stops waiting; the saga goes on.
            self._tg.start_soon(self._run_in_background, run)
            await run.done.wait()
            outcome = run.outcome
            if outcome is None:  # the run failed unexpectedly: what is stored is the truth
                return await self.result(run.saga_id)
        else:
            try:  # ``_run`` inline: a coroutine less under each saga being executed
                outcome = await run.run()
            finally:
                self._runs.pop(run.saga_id, None)
        if run.lost or run.suspended:
            # Another worker owns the saga now (or will resume it): wait for its real end.
            return await self.result(run.saga_id)
        return self._conclude(outcome, definition)

    async def start(
        self,
        saga: DeclarativeSaga | type[DeclarativeSaga],
        context: Mapping[str, Any] | None = None,
        saga_id: str | None = None,
    ) -> str:
        """Durably enqueue a saga and return its id without waiting for it.

        Idempotent on ``saga_id`` (same input: the existing saga's id; different input:
        ``SagaConflict``). An open orchestrator (``async with``) starts running it at once in the
        background; otherwise it waits, ``PENDING``, for a worker.
        """
        instance, definition = _definition_of(saga)
        sid, run = await self._begin(
            instance, definition, context, saga_id, leased=self._tg is not None
        )
        if run is not None and self._tg is not None:
            self._tg.start_soon(self._run_in_background, run)
        return sid

    async def get(self, saga_id: str) -> SagaState:
        """The saga's stored state (status, reason, per-step status/result/error).

        Raises ``SagaNotFound`` (a ``LookupError``) for an unknown id.
        """
        return await self.storage.load_saga(saga_id)

    async def result(self, saga_id: str, timeout: float | None = None) -> SagaResult:
        """Wait until the saga is settled; return its data or raise ``SagaFailed``.

        ``FAILED`` counts as settled (it needs an operator). Raises ``TimeoutError`` after
        ``timeout`` seconds and ``SagaNotFound`` for an unknown id.
        """
        with anyio.fail_after(timeout):
            run = self._runs.get(saga_id)
            if run is not None:
                await run.done.wait()
                if run.outcome is not None:
                    return self._conclude(run.outcome, run.definition)
            delay = 0.02
            while True:
                state = await self.storage.load_saga(saga_id)
                if state.status in _SETTLED:
                    return self._conclude(RunOutcome(state), None)
                await anyio.sleep(delay)
                delay = min(delay * 1.5, 0.5)

    async def cancel(self, saga_id: str) -> SagaState:
        """Abort a saga and compensate it; returns its state once settled.

        A saga running in this process stops starting steps, cancels those in flight (their
        outcome becomes unknown) and compensates. A ``PENDING`` saga is compensated at once
        (nothing ran). A saga past its pivot, or already settled, cannot be cancelled
        (``SagaError``).
        """
        run = self._runs.get(saga_id)
        if run is not None:
            self._check_cancellable(run.definition, run.steps)
            run.cancel()
            await run.done.wait()
            return await self.storage.load_saga(saga_id)
        state = await self.storage.load_saga(saga_id)
        if state.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED):
            raise SagaError(f"saga {saga_id!r} is already {state.status.value}; nothing to cancel")
        if state.status == SagaStatus.FAILED:
            raise SagaError(
                f"saga {saga_id!r} is FAILED ({state.reason}); use retry or resolve, not cancel"
            )
        # Everything that can refuse is checked before the saga is leased, so a refusal
        # never leaves a lease behind.
        cls = registered_saga(state.saga_type)
        definition = cls.definition()
        if definition.version != state.definition_hash:
            raise SagaError(
                f"saga {saga_id!r} was stored by definition {state.definition_hash} of "
                f"{state.saga_type!r}; this code has {definition.version}, so it must not act on it"
            )
        self._check_cancellable(definition, state.steps)
        fence = await self.storage.claim_saga(saga_id, self.owner, self.lease_seconds)
        if fence is None:
            raise SagaError(
                f"saga {saga_id!r} is running in another worker ({state.lease_owner}); "
                "cancel it there"
            )
        state = await self.storage.load_saga(saga_id)  # as of our claim
        run = self._new_run(cls(), definition, state, fence)
        run.cancel()
        await self._run(run)
        return await self.storage.load_saga(saga_id)

    # --- internals -----------------------------------------------------------------------
    async def _begin(
        self,
        saga: DeclarativeSaga,
        definition: SagaDefinition,
        context: Mapping[str, Any] | None,
        saga_id: str | None,
        *,
        leased: bool,
    ) -> tuple[str, SagaRun | None]:
        data = check_json_object({} if context is None else context, "context")
        if saga_id is not None and (
            not isinstance(saga_id, str) or not saga_id or len(saga_id) > 255
        ):
            raise ValueError(
                f"saga_id must be a non-empty str of at most 255 characters, got {saga_id!r}"
            )
        if saga_id is not None and (problem := text_problem(saga_id)) is not None:
            raise ValueError(f"saga_id {problem}")
        sid = saga_id or new_uuid4()
        roots = definition.roots if leased else ()
        new = NewSaga(
            sid, definition.saga_type, definition.version, data, definition.step_names, roots
        )
        state, fence = await self.storage.create_saga(
            new, lease_owner=self.owner if leased else None, lease_seconds=self.lease_seconds
        )
        if state.definition_hash != definition.version:
            raise SagaDefinitionError(
                f"saga {sid!r} was stored by another version of {definition.saga_type!r} "
                f"({state.definition_hash}, this code has {definition.version})"
            )
        if fence is None:
            return sid, None
        run = self._new_run(saga, definition, state, fence, prestarted=new.opened)
        self._runs[sid] = run
        return sid, run

    def _new_run(
        self,
        saga: DeclarativeSaga,
        definition: SagaDefinition,
        state: SagaState,
        fence: Fence,
        *,
        prestarted: tuple[str, ...] = (),
    ) -> SagaRun:
        return SagaRun(
            store=self.storage,
            definition=definition,
            saga=saga,
            state=state,
            fence=fence,
            limits=self._limits,
            lease_seconds=self.lease_seconds,
            publisher=self._publisher,
            prestarted=prestarted,
        )

    async def _run(self, run: SagaRun) -> RunOutcome:
        self._runs[run.saga_id] = run
        try:
            return await run.run()
        finally:
            self._runs.pop(run.saga_id, None)

    async def _run_in_background(self, run: SagaRun) -> None:
        try:
            await self._run(run)
        except Exception:
            # The saga stays recorded as it was; recovery continues it. Never crash siblings.
            log.exception("saga %s: run aborted", run.saga_id)

    def _check_cancellable(self, definition: SagaDefinition, steps: Mapping[str, Any]) -> None:
        p = definition.pivot
        if p is not None and steps[p].status == StepStatus.SUCCEEDED:
            raise SagaError(f"the pivot {p!r} has completed: the saga can only go forward now")

    def _conclude(self, outcome: RunOutcome, definition: SagaDefinition | None) -> SagaResult:
        state = outcome.state
        if state.status == SagaStatus.COMPLETED:
            return _result_of(state, definition)
        raise _failed_of(outcome, state)
