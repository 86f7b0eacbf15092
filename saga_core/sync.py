"""``SyncSagaOrchestrator``: the same calls without ``await``, for Flask, Django and scripts.

It runs a ``SagaOrchestrator`` on one lazily started event-loop thread (a blocking portal),
re-created after ``fork()``, and is safe to share between threads. A call from inside an event
loop, or from a saga step's own thread, would deadlock or starve the loop, so it raises
``BlockingCallInEventLoop`` instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from saga_core._invoke import in_step_thread
from saga_core.definition import DeclarativeSaga
from saga_core.errors import BlockingCallInEventLoop
from saga_core.orchestrator import SagaOrchestrator, SagaResult
from saga_core.ports import Broker
from saga_core.records import SagaState

_INHERITED: list[object] = []


def _running_loop() -> str | None:
    if asyncio._get_running_loop() is not None:
        return "asyncio"
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            return None
        return "trio"
    return None


def check_blocking_allowed(call: str) -> None:
    """Raise ``BlockingCallInEventLoop`` if a blocking ``call`` here would deadlock."""
    loop = _running_loop()
    if loop is not None:
        raise BlockingCallInEventLoop(
            f"SyncSagaOrchestrator.{call}() was called inside a running {loop} event loop, where "
            "it would block the loop; use SagaOrchestrator and await it instead"
        )
    if in_step_thread():
        raise BlockingCallInEventLoop(
            f"SyncSagaOrchestrator.{call}() was called from inside a saga step's thread; a step "
            "waiting for a saga can deadlock the orchestrator (start() another saga from the "
            "caller instead)"
        )


class SyncSagaOrchestrator:
    """Blocking facade over :class:`SagaOrchestrator` (same arguments, same methods).

    The event-loop thread starts on first use and stops on :meth:`close` (or when used as a
    context manager). While it runs, sagas started with :meth:`start` run in the background and
    the outbox is relayed to ``broker`` if one is given.

    Args:
        storage, broker, **options: as for ``SagaOrchestrator``.
        backend: ``"asyncio"`` (default) or ``"trio"`` for the loop thread.
    """

    def __init__(
        self,
        storage: Any,
        broker: Broker | None = None,
        *,
        backend: str = "asyncio",
        **options: Any,
    ) -> None:
        self._storage = storage
        self._broker = broker
        self._backend = backend
        self._options = options
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._orch_cm: AbstractContextManager[SagaOrchestrator] | None = None
        self._orch: SagaOrchestrator | None = None
        # Validate arguments now, in the caller's thread, rather than on first use.
        SagaOrchestrator(storage, broker, **options)

    def _ensure(self, call: str) -> tuple[BlockingPortal, SagaOrchestrator]:
        check_blocking_allowed(call)
        with self._lock:
            if self._pid != os.getpid():
                # After fork() the loop thread does not exist in the child: start afresh. The
                # parent's context managers are kept alive on purpose: finalizing them would
                # ask the parent's (absent) loop thread to stop, and wait forever.
                _INHERITED.append((self._portal_cm, self._orch_cm))
                self._portal_cm = self._portal = self._orch_cm = self._orch = None
                self._pid = os.getpid()
            if self._portal is None or self._orch is None:
                cm = start_blocking_portal(self._backend)
                portal = cm.__enter__()
                try:
                    orch = SagaOrchestrator(self._storage, self._broker, **self._options)
                    orch_cm = portal.wrap_async_context_manager(orch)
                    orch_cm.__enter__()
                except BaseException:
                    cm.__exit__(*sys.exc_info())
                    raise
                self._portal_cm, self._portal, self._orch_cm, self._orch = cm, portal, orch_cm, orch
            return self._portal, self._orch

    def execute(
        self,
        saga: DeclarativeSaga | type[DeclarativeSaga],
        context: Mapping[str, Any] | None = None,
        saga_id: str | None = None,
    ) -> SagaResult:
        """Run a saga to its end; see ``SagaOrchestrator.execute``."""
        portal, orch = self._ensure("execute")
        result: SagaResult = portal.call(orch.execute, saga, context, saga_id)
        return result

    def start(
        self,
        saga: DeclarativeSaga | type[DeclarativeSaga],
        context: Mapping[str, Any] | None = None,
        saga_id: str | None = None,
    ) -> str:
        """Enqueue a saga and run it in the background; see ``SagaOrchestrator.start``."""
        portal, orch = self._ensure("start")
        saga_id_: str = portal.call(orch.start, saga, context, saga_id)
        return saga_id_

    def get(self, saga_id: str) -> SagaState:
        """The saga's stored state; see ``SagaOrchestrator.get``."""
        portal, orch = self._ensure("get")
        return portal.call(orch.get, saga_id)

    def result(self, saga_id: str, timeout: float | None = None) -> SagaResult:
        """Wait for a saga to settle; see ``SagaOrchestrator.result``."""
        portal, orch = self._ensure("result")
        return portal.call(orch.result, saga_id, timeout)

    def cancel(self, saga_id: str) -> SagaState:
        """Abort and compensate a saga; see ``SagaOrchestrator.cancel``."""
        portal, orch = self._ensure("cancel")
        return portal.call(orch.cancel, saga_id)

    def close(self) -> None:
        """Wait for background sagas, stop the relay and the loop thread. Idempotent."""
        with self._lock:
            orch_cm, portal_cm = self._orch_cm, self._portal_cm
            self._portal_cm = self._portal = self._orch_cm = self._orch = None
            if self._pid != os.getpid():
                return
        if orch_cm is not None:
            orch_cm.__exit__(None, None, None)
        if portal_cm is not None:
            portal_cm.__exit__(None, None, None)

    def __enter__(self) -> SyncSagaOrchestrator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
