"""``SagaWorker``: runs sagas found in storage; the recovery loop of DESIGN.md section 3.

A worker claims (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) sagas that are ``PENDING``, whose
lease expired (their worker died or stalled), or whose persisted retry time came, but only of
the saga types and definition versions it has imported. It resumes each forward or continues
its compensation. Any number of workers, in any number of processes or machines, can share one
database; it is the only coordinator.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable

import anyio
from anyio.abc import TaskGroup

from saga_core._run import Limits, SagaRun
from saga_core.definition import DeclarativeSaga, registered_sagas
from saga_core.errors import StorageError
from saga_core.outbox import OptimisticPublisher, OutboxWorker
from saga_core.ports import Broker, OutboxStore, SagaStore
from saga_core.records import Fence

log = logging.getLogger("saga.worker")


class SagaWorker:
    """Claims and runs sagas from ``storage`` until stopped.

    Args:
        storage: the shared storage.
        broker: when given (and ``relay`` is true), the outbox is relayed beside recovery.
        sagas: saga classes this worker may run (default: every class imported so far).
        concurrency: sagas run at once by this worker.
        lease_seconds: lease length; recovery scans at least every half lease.
        poll_interval: idle scan period (jittered), at most half a lease.
        max_crashes: attempts of one step that may die with their worker before the saga is
            parked ``FAILED`` (reason ``crash_loop``).
        suspend_after: a retry backoff this long or longer releases the lease; the saga is
            resumed by whichever worker is free when it is due.
        shutdown_grace: on stop, seconds to let running sagas finish before cancelling them.
        optimistic: publish step events right after their commit (see ``OptimisticPublisher``).
    """

    def __init__(
        self,
        storage: SagaStore,
        broker: Broker | None = None,
        *,
        sagas: Iterable[type[DeclarativeSaga]] | None = None,
        concurrency: int = 16,
        lease_seconds: float = 30.0,
        poll_interval: float = 0.5,
        max_crashes: int = 5,
        suspend_after: float = 5.0,
        shutdown_grace: float = 10.0,
        relay: bool = True,
        owner: str | None = None,
        step_threads: int = 32,
        optimistic: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.storage = storage
        self.broker = broker
        classes = list(sagas) if sagas is not None else list(registered_sagas().values())
        self.classes = {cls.definition().saga_type: cls for cls in classes}
        self.known = {t: [cls.definition().version] for t, cls in self.classes.items()}
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.poll_interval = min(poll_interval, lease_seconds / 2)
        self.max_crashes = max_crashes
        self.suspend_after = suspend_after
        self.shutdown_grace = shutdown_grace
        self.relay = relay
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._limits = Limits(step_threads)
        self._publisher = (
            OptimisticPublisher(storage, broker)
            if optimistic and broker is not None and isinstance(storage, OutboxStore)
            else None
        )
        self.running: dict[str, SagaRun] = {}
        #: Sagas this worker has run to an end (settled, parked, suspended or lost).
        self.finished = 0
        self._stopping = anyio.Event()
        self._wake = anyio.Event()

    async def run(self) -> None:
        """Claim and run sagas (and relay the outbox) until :meth:`stop` or cancellation."""
        async with anyio.create_task_group() as tg:
            relay_scope = anyio.CancelScope()
            if self.relay and self.broker is not None and isinstance(self.storage, OutboxStore):
                tg.start_soon(self._relay, relay_scope)
            async with anyio.create_task_group() as runs:
                await self._recover(runs)
                # Stopping: claim nothing more; let running sagas finish for a while.
                with anyio.move_on_after(self.shutdown_grace):
                    for run in list(self.running.values()):
                        await run.done.wait()
                runs.cancel_scope.cancel()  # each run releases its lease as it is cancelled
            relay_scope.cancel()

    def stop(self) -> None:
        """Ask :meth:`run` to stop claiming, finish (within the grace period) and return."""
        self._stopping.set()

    async def run_until_signalled(self) -> None:
        """:meth:`run` until SIGINT or SIGTERM, then stop gracefully (for ``saga worker``)."""
        # The signals are caught before the first claim: a worker stopped as it starts still
        # stops gracefully.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:

                async def watch_signals() -> None:
                    async for signum in signals:
                        log.info("received %s: stopping", signal.Signals(signum).name)
                        self.stop()
                        return

                tg.start_soon(watch_signals)
                await self.run()
                tg.cancel_scope.cancel()

    async def run_once(self) -> int:
        """Claim what is claimable now, run it to its end, return how many sagas ran (tests,
        scripts)."""
        async with anyio.create_task_group() as runs:
            started = await self._claim(runs)
        return started

    async def _relay(self, scope: anyio.CancelScope) -> None:
        assert self.broker is not None
        assert isinstance(self.storage, OutboxStore)
        with scope:
            await OutboxWorker(self.storage, self.broker).run()

    async def _recover(self, runs: TaskGroup) -> None:
        noted = False
        while not self._stopping.is_set():
            try:
                if not noted:
                    await self.storage.note_unknown_versions(self.owner, self.known)
                    noted = True
                await self._claim(runs)
            except StorageError as exc:
                log.warning("recovery scan failed (%s); retrying", exc)
            with anyio.move_on_after(self.poll_interval * random.uniform(0.5, 1.0)):
                await _first(self._stopping.wait, self._wake.wait)
            self._wake = anyio.Event()

    async def _claim(self, runs: TaskGroup) -> int:
        free = self.concurrency - len(self.running)
        if free <= 0:
            return 0
        fences = await self.storage.claim_sagas(
            self.owner, self.known, limit=free, lease_seconds=self.lease_seconds
        )
        for fence in fences:
            runs.start_soon(self._run_one, fence)
        return len(fences)

    async def _run_one(self, fence: Fence) -> None:
        try:
            state = await self.storage.load_saga(fence.saga_id)
            cls = self.classes[state.saga_type]
            run = SagaRun(
                store=self.storage,
                definition=cls.definition(),
                saga=cls(),
                state=state,
                fence=fence,
                limits=self._limits,
                lease_seconds=self.lease_seconds,
                max_crashes=self.max_crashes,
                suspend_after=self.suspend_after,
                publisher=self._publisher,
            )
            self.running[fence.saga_id] = run
            await run.run()
        except Exception:
            # Left as recorded; its lease expires and a worker (maybe this one) resumes it.
            log.exception("saga %s: run aborted", fence.saga_id)
        finally:
            self.running.pop(fence.saga_id, None)
            self.finished += 1
            self._wake.set()  # a slot is free: look for more work now


async def _first(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as any of the given zero-argument async callables returns."""
    async with anyio.create_task_group() as tg:

        async def one(fn: Callable[[], Awaitable[object]]) -> None:
            await fn()
            tg.cancel_scope.cancel()

        for fn in waits:
            tg.start_soon(one, fn)
