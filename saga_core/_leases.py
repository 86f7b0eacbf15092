"""Lease renewal shared by every run of an event loop (DESIGN.md section 3).

Each running saga must renew its lease every third of the lease length. Done per saga, that is
one transaction per saga per period: with thousands of sagas in flight, more transactions than
the sagas' own (coalesced) writes. Here the runs of one store, owner and lease length form a
``LeaseGroup``, and renewals due at about the same time go out as one ``renew_leases`` call.

* **Grid.** A run's next renewal is due at the *start* of the grid cell (``lease / 12`` long) in
  which a keeper of its own would have renewed it, so runs that started at different moments
  fall on shared instants, and a run is never renewed later than that keeper would have.
* **One driver per group.** A run registers (``LeaseKeeper.start``) and unregisters
  (``stop``); it owns no task. The group's renewals are made by one driver task that sleeps
  until the earliest due time, renews in one call every run due within one grid cell from
  then, and exits when the group has no runs left. It is a *system* task of the event loop
  (``asyncio`` ``create_task`` / ``trio.lowlevel.spawn_system_task``), not a child of any run:
  a run that ends or is cancelled never takes the others' renewals with it, and its own lease
  stays renewed until it unregisters, after any shielded compensation. A task per run cost
  about a quarter of a saga's CPU (its creation, a timer, a cancel scope, a task group).
* **Trust.** As in a keeper per run: a run trusts its lease until ``start + lease - margin``
  (``margin = lease / 4``), where ``start`` is the monotonic time at which the last successful
  call including it *started*. A failed call (any error: a pool timeout is no proof either)
  changes nothing but the retry time, the last retry a grid cell before trust ends so that
  its answer can still count. When trust ends the run stops (its ``on_lost`` is called),
  whether or not a call is in flight (a renewal that does not answer never stretches
  trust). A fence missing from a call's answer means the lease was taken (or let go): that
  run, and only that one, stops.
* **Ending.** A run that ends unregisters; a renewal already in flight that included it
  reports nothing to it (it may have let the lease go itself).

State lives per event loop (``LoopLocal``): the sync facade runs its own loop thread, and events
and tasks cannot cross loops.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio

from saga_core._loop_local import LoopLocal
from saga_core.errors import StorageError
from saga_core.ports import SagaStore
from saga_core.records import Fence

__all__ = ["LeaseGroup", "LeaseKeeper"]

log = logging.getLogger("saga")

#: Shortest wait between two attempts for one run, as the per-run keeper had: a call that took
#: longer than the lease must not turn the driver into a busy loop.
MIN_WAIT = 0.01

#: Fences per statement. Far more than the runs one process usually holds; it keeps the
#: statement under the bind-parameter limits of the databases (999 in SQLite before 3.32).
MAX_FENCES = 900

_Key = tuple[int, str, float]
_groups: LoopLocal[dict[_Key, LeaseGroup]] = LoopLocal("saga_lease_groups", dict)


@dataclass(eq=False)  # members are told apart by identity: one saga may be run twice in turn
class _Member:
    """One run's lease as its group sees it."""

    fence: Fence
    #: Called once when the lease is lost (in the driver task; must not block).
    on_lost: Callable[[], object] | None = None
    #: Monotonic start of the last successful renewal that included this run (registration
    #: time until then: a fresh lease is trusted from the moment the run registers).
    last_start: float = 0.0
    #: The run acts for the saga until then without a further successful renewal.
    trusted_until: float = 0.0
    #: When this run's next renewal attempt is due (monotonic).
    due: float = 0.0
    #: The lease was taken or could not be renewed in time: the run must stop.
    lost: bool = False
    #: The run ended (``LeaseKeeper.stop``): it is not renewed again.
    stopped: bool = False

    @property
    def over(self) -> bool:
        return self.lost or self.stopped

    def lose(self) -> None:
        if self.over:
            return
        self.lost = True
        if self.on_lost is not None:
            try:
                self.on_lost()
            except Exception:  # the driver serves every run: one callback must not stop it
                log.exception("saga %s: lease-lost callback failed", self.fence.saga_id)

    def stop(self) -> None:
        self.stopped = True


class LeaseGroup:
    """The runs of one event loop holding leases of one store, owner and lease length.

    Never mixes owners or lease lengths: a call renews every fence it gets for ``lease_seconds``
    on behalf of one owner.
    """

    def __init__(
        self, store: SagaStore, owner: str, lease_seconds: float, registry: dict[_Key, LeaseGroup]
    ) -> None:
        self.store = store
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.period = lease_seconds / 3  # how often a run is renewed
        self.margin = lease_seconds / 4  # trust ends this long before the lease would
        self.quantum = lease_seconds / 12  # the grid due times are aligned to
        self.members: set[_Member] = set()
        #: This loop's groups, which holds this one while it has runs (or a driver).
        self._registry = registry
        #: The driver task (asyncio), or True for trio's; None when no driver runs.
        self._driver: object | None = None
        #: The driver sleeps until ``_until`` unless ``_nudge`` is set first.
        self._until = math.inf
        self._nudge: anyio.Event | None = None

    def join(self, member: _Member) -> None:
        """Register ``member``: its lease is trusted from now and renewed a period from now."""
        now = time.monotonic()
        member.last_start = now
        member.trusted_until = now + self.lease_seconds - self.margin
        member.due = self._grid(now + self.period)
        self.members.add(member)
        if self._driver is None:
            try:
                self._driver = _spawn_system_task(self._drive)
            except BaseException:  # e.g. trio's system nursery closing at shutdown
                self.members.discard(member)
                raise
        elif member.due < self._until:
            self._wake_driver()

    def leave(self, member: _Member) -> None:
        """Unregister ``member``; the driver exits once no run is left."""
        self.members.discard(member)
        if not self.members:
            self._wake_driver()

    def _wake_driver(self) -> None:
        if self._nudge is not None:
            self._nudge.set()

    def _grid(self, t: float) -> float:
        """The start of the grid cell holding ``t``."""
        return math.floor(t / self.quantum) * self.quantum

    def _next_due(self, now: float, trusted_until: float) -> float:
        """When to try next after an attempt that ended at ``now``: a period later, but at
        the latest a grid cell before trust runs out, so that a failing database is retried
        once more while an answer can still count (a call in flight when trust ends stops
        its runs, see ``_expire_while_waiting``)."""
        due = min(self._grid(now + self.period), trusted_until - self.quantum)
        if due <= now:  # no useful attempt left: the run is stopped when its trust ends
            due = trusted_until
        return max(now + MIN_WAIT, due)

    async def _drive(self) -> None:
        """Renew whatever is due, sleep until the next due time; exit when no run is left."""
        try:
            while self.members:
                now = time.monotonic()
                due = min(m.due for m in self.members)
                if due > now:
                    self._nudge, self._until = anyio.Event(), due
                    with anyio.move_on_after(due - now):
                        await self._nudge.wait()
                    self._nudge, self._until = None, math.inf
                else:
                    await self._renew()
        except Exception:
            # A bug in this module (a failed call is handled per call): no run here can trust
            # its lease any more, so each stops rather than act on an unrenewed lease.
            log.exception("lease renewal for owner %s failed; stopping its runs", self.owner)
            for m in list(self.members):
                self.members.discard(m)
                m.lose()
        finally:
            # Cancelled (the loop is shutting down, and its runs with it): the runs left are
            # not told anything, since a run told it lost its lease would stop handling its
            # own cancellation. Fencing keeps their writes safe; a run that registers next
            # starts a new driver.
            self._driver = None  # also breaks the group -> task -> coroutine -> group cycle
            self._nudge, self._until = None, math.inf
            if not self.members:
                self._forget()

    def _forget(self) -> None:
        # The key holds a store's id, which a new store may reuse once this one is gone.
        key = (id(self.store), self.owner, self.lease_seconds)
        if self._registry.get(key) is self:
            del self._registry[key]

    async def _renew(self) -> None:
        """Stop the runs whose trust has ended; renew every run due within one grid cell."""
        now = time.monotonic()
        self._expire(now, "lease not renewed in time")
        horizon = now + self.quantum
        batch: list[_Member] = []
        sagas: set[str] = set()
        for m in self.members:
            # One fence per saga and call: the answer names sagas, not epochs, so a run lost
            # to a newer run of the same saga here must not read the newer one's success as
            # its own. The other stays due and goes in the next call.
            if m.due < horizon and m.fence.saga_id not in sagas:
                sagas.add(m.fence.saga_id)
                batch.append(m)
        if not batch:
            return
        # Shielded: the loop shutting down must not leave a call half-answered.
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._expire_while_waiting)
                for i in range(0, len(batch), MAX_FENCES):
                    await self._renew_batch(batch[i : i + MAX_FENCES])
                tg.cancel_scope.cancel()

    async def _expire_while_waiting(self) -> None:
        """While a call is in flight, stop every run whose trust runs out meanwhile.

        A call that does not answer (a connection gone silent, a lock held elsewhere) must not
        stretch any run's trust: without this, runs would go on acting until the call ended,
        possibly long after another worker took their sagas over.
        """
        while True:
            until = min((m.trusted_until for m in self.members), default=math.inf)
            if until == math.inf:
                await anyio.sleep_forever()
            delay = until - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
            else:
                self._expire(time.monotonic(), "lease renewal did not answer in time")

    def _expire(self, now: float, why: str) -> None:
        """Stop every run whose trust has ended by ``now``."""
        for m in list(self.members):
            if now >= m.trusted_until:
                log.warning("saga %s: %s", m.fence.saga_id, why)
                self._lost(m)

    def _lost(self, member: _Member) -> None:
        self.members.discard(member)
        member.lose()

    async def _renew_batch(self, batch: list[_Member]) -> None:
        started = time.monotonic()
        try:
            held = await self.store.renew_leases(
                self.owner, [m.fence for m in batch], self.lease_seconds
            )
        except Exception as exc:
            # A failed call proves nothing either way: retry until trust runs out. Not only
            # StorageError: a pool timeout or a disposed engine must not stop every run.
            live = [m for m in batch if not m.over]  # ended runs need nothing (nor a log)
            if live and not isinstance(exc, StorageError):
                log.warning("lease renewal for owner %s failed: %r", self.owner, exc)
            ended = time.monotonic()
            for m in live:
                if ended >= m.trusted_until:
                    log.warning("saga %s: cannot renew lease (%s)", m.fence.saga_id, exc)
                    self._lost(m)
                else:
                    m.due = self._next_due(ended, m.trusted_until)
            return
        ended = time.monotonic()
        for m in batch:
            if m.over:
                continue  # its run ended during the call (and may have let the lease go)
            if m.fence.saga_id not in held:
                self._lost(m)
                continue
            # Trust follows the start of the call; a call that started before the run's last
            # success proves nothing newer (calls of a group never overlap, so this is a guard).
            if started >= m.last_start:
                m.last_start = started
                m.trusted_until = started + self.lease_seconds - self.margin
            m.due = self._next_due(ended, m.trusted_until)


def _spawn_system_task(fn: Callable[[], Coroutine[Any, Any, None]]) -> object:
    """Start ``fn()`` as a task of the running event loop that belongs to no caller; returns
    a reference the caller must hold until the task ends (asyncio's loop holds its tasks only
    weakly).

    ``fn`` must handle its own errors. On asyncio the task runs in an empty context, so it
    carries none of the caller's context variables (a trace span, say) for its whole life.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: anyio's other backend
        import trio

        trio.lowlevel.spawn_system_task(fn, name="saga-outbox lease renewals")
        return True
    return contextvars.Context().run(loop.create_task, fn(), name="saga-outbox lease renewals")


class LeaseKeeper:
    """Keeps one run's lease renewed with the other runs of its event loop and lease group.

    ``start()`` registers the run; ``on_lost`` is called (once, from the group's driver task)
    when the run must stop acting for the saga: the lease was taken by another owner (or let
    go), or no renewal succeeded by the time it could no longer be trusted. ``stop()`` when
    the run ends unregisters it (stopping first makes a later ``start()`` do nothing).
    """

    def __init__(
        self,
        store: SagaStore,
        fence: Fence,
        lease_seconds: float,
        on_lost: Callable[[], object] | None = None,
    ) -> None:
        self._store = store
        self._lease_seconds = lease_seconds
        self._member = _Member(fence, on_lost)
        self._group: LeaseGroup | None = None

    @property
    def lost(self) -> bool:
        """Whether the lease was lost (``on_lost`` has been called)."""
        return self._member.lost

    def start(self) -> None:
        """Register with this event loop's group (must be called from within the loop)."""
        if self._member.over or self._group is not None:
            return
        groups = _groups.get()
        key = (id(self._store), self._member.fence.owner, self._lease_seconds)
        group = groups.get(key)
        if group is None:
            group = groups[key] = LeaseGroup(
                self._store, self._member.fence.owner, self._lease_seconds, groups
            )
        self._group = group
        group.join(self._member)

    def stop(self) -> None:
        """The run ended: stop renewing its lease."""
        self._member.stop()
        if self._group is not None:
            self._group.leave(self._member)
