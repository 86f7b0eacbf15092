"""Lease renewal shared by every run of an event loop (DESIGN.md section 3).

Each running saga must renew its lease every third of the lease length. Done per saga, that is
one transaction per saga per period: with thousands of sagas in flight, more transactions than
the sagas' own (coalesced) writes. Here the runs of one store, owner and lease length form a
``LeaseGroup``, and renewals due at about the same time go out as one ``renew_leases`` call.

* **Grid.** A run's next renewal is due at the *start* of the grid cell (``lease / 12`` long) in
  which ``_keep_lease`` would have renewed it, so runs that started at different moments fall
  on shared instants, and a run is never renewed later than a keeper of its own would have.
* **Leader.** No background task (anyio has none that outlives its caller): each run waits in
  its own task until its renewal is due. The first one due while no call is in flight becomes
  the leader and renews, in one call, every run of the group due within one grid cell from
  then; the others wait for that call to end, then see their new due time. The leader's
  call is shielded, so cancelling the leader's run (it finished) never breaks the renewal the
  others wait for; a waiter that is cancelled just stops waiting.
* **Trust.** As in a keeper per run: a run trusts its lease until ``start + lease - margin``
  (``margin = lease / 4``), where ``start`` is the monotonic time at which the last successful
  call including it *started*. A failed call (``StorageError``) changes nothing but the retry
  time; the first failure at or after that instant makes the run stop. A fence missing from a
  call's answer means the lease was taken (or let go): that run, and only that one, stops.
* **Ending.** A run that ends tells its keeper (``LeaseKeeper.stop``), which returns at once,
  instead of being cancelled: a cancelled task leaves an exception and its traceback in a
  reference cycle, which only the garbage collector frees; with thousands of sagas a second,
  those collections cost more than the sagas' own work.

State lives per event loop (``RunVar``): the sync facade runs its own loop thread, and events
and tasks cannot cross loops.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import anyio
from anyio.lowlevel import RunVar, checkpoint_if_cancelled

from saga_core.errors import StorageError
from saga_core.ports import SagaStore
from saga_core.records import Fence

__all__ = ["LeaseGroup", "LeaseKeeper", "keep_lease"]

log = logging.getLogger("saga")

#: Shortest wait between two attempts for one run, as the per-run keeper had: a call that took
#: longer than the lease must not turn the keeper into a busy loop.
MIN_WAIT = 0.01

#: Fences per statement. Far more than the runs one process usually holds; it keeps the
#: statement under the bind-parameter limits of the databases (999 in SQLite before 3.32).
MAX_FENCES = 900

_Key = tuple[int, str, float]
_groups: RunVar[dict[_Key, LeaseGroup]] = RunVar("saga_lease_groups")


@dataclass(eq=False)  # members are told apart by identity: one saga may be run twice in turn
class _Member:
    """One run's lease as its group sees it."""

    fence: Fence
    #: Monotonic start of the last successful renewal that included this run (registration
    #: time until then: the keeper per run trusted a fresh lease from the moment it started).
    last_start: float
    #: The run acts for the saga until then without a further successful renewal.
    trusted_until: float
    #: When this run's next renewal attempt is due (monotonic).
    due: float = 0.0
    #: The lease was taken or could not be renewed in time: the run must stop.
    lost: bool = False
    #: The run ended (``LeaseKeeper.stop``): its keeper returns without renewing it again.
    stopped: bool = False
    #: Wakes the keeper: lost, stopped, or the call it waited for ended. Replaced after each
    #: wake, so a run renewed ahead of its due time hears at once, not when it wakes.
    wake: anyio.Event = field(default_factory=anyio.Event)

    def signal(self, *, lost: bool = False, stopped: bool = False) -> None:
        self.lost = self.lost or lost
        self.stopped = self.stopped or stopped
        self.wake.set()

    @property
    def over(self) -> bool:
        return self.lost or self.stopped


class LeaseGroup:
    """The runs of one event loop holding leases of one store, owner and lease length.

    Never mixes owners or lease lengths: a call renews every fence it gets for ``lease_seconds``
    on behalf of one owner.
    """

    def __init__(self, store: SagaStore, owner: str, lease_seconds: float) -> None:
        self.store = store
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.period = lease_seconds / 3  # how often a run is renewed
        self.margin = lease_seconds / 4  # trust ends this long before the lease would
        self.quantum = lease_seconds / 12  # the grid due times are aligned to
        self.members: set[_Member] = set()
        #: A leader's call is in flight; the members in ``waiting`` are woken when it ends.
        self.busy = False
        self.waiting: set[_Member] = set()

    async def hold(self, member: _Member) -> bool:
        """Keep ``member``'s lease renewed with the rest of the group.

        Returns True when the run must stop acting for the saga: the lease was taken by
        another owner (or let go), or no renewal succeeded by the time the lease could no
        longer be trusted; False once the member is stopped (its run ended). Cancelling the
        caller unregisters the fence too, so a released lease is not renewed again.
        """
        if member.over:
            return member.lost
        now = time.monotonic()
        member.last_start = now
        member.trusted_until = now + self.lease_seconds - self.margin
        member.due = self._grid(now + self.period)
        self.members.add(member)
        try:
            while not member.over:
                if member.wake.is_set():
                    member.wake = anyio.Event()
                wait = member.due - time.monotonic()
                if wait > 0:
                    with anyio.move_on_after(wait):
                        await member.wake.wait()
                elif self.busy:
                    # The call in flight may include this run (it was due within the leader's
                    # window) or not (it became due meanwhile): look again once it ends.
                    self.waiting.add(member)
                    try:
                        await member.wake.wait()
                    finally:
                        self.waiting.discard(member)
                else:
                    # A cancelled run (it ended) takes no lead: its shielded call would hold it.
                    await checkpoint_if_cancelled()
                    if not self.busy:
                        await self._renew()
        finally:
            self.members.discard(member)
        return member.lost

    def _grid(self, t: float) -> float:
        """The start of the grid cell holding ``t``."""
        return math.floor(t / self.quantum) * self.quantum

    def _next_due(self, now: float, trusted_until: float) -> float:
        """When to try next after an attempt that ended at ``now``: a period later, but at
        the latest when trust runs out (so a failing database is retried once more then)."""
        return max(now + MIN_WAIT, min(self._grid(now + self.period), trusted_until))

    async def _renew(self) -> None:
        """As leader: renew every run due within one grid cell from now."""
        # No checkpoint between taking the lead and entering the shield: a cancelled leader
        # either never took the lead or completes the call for everyone it took.
        self.busy = True
        try:
            horizon = time.monotonic() + self.quantum
            batch: list[_Member] = []
            sagas: set[str] = set()
            for m in self.members:
                # One fence per saga and call: the answer names sagas, not epochs, so a run
                # lost to a newer run of the same saga here must not read the newer one's
                # success as its own. The other stays due and goes in the next call.
                if not m.over and m.due < horizon and m.fence.saga_id not in sagas:
                    sagas.add(m.fence.saga_id)
                    batch.append(m)
            with anyio.CancelScope(shield=True):
                for i in range(0, len(batch), MAX_FENCES):
                    await self._renew_batch(batch[i : i + MAX_FENCES])
        finally:
            self.busy = False
            for m in self.waiting:
                m.wake.set()

    async def _renew_batch(self, batch: list[_Member]) -> None:
        started = time.monotonic()
        try:
            held = await self.store.renew_leases(
                self.owner, [m.fence for m in batch], self.lease_seconds
            )
        except StorageError as exc:
            ended = time.monotonic()
            for m in batch:
                if m not in self.members:
                    continue  # its run ended during the call: nothing to report to it
                if ended >= m.trusted_until:
                    log.warning("saga %s: cannot renew lease (%s)", m.fence.saga_id, exc)
                    m.signal(lost=True)
                else:
                    m.due = self._next_due(ended, m.trusted_until)
            return
        ended = time.monotonic()
        for m in batch:
            if m.stopped:
                continue  # its run ended during the call (and may have let the lease go)
            if m.fence.saga_id not in held:
                m.signal(lost=True)
                continue
            # Trust follows the start of the call; a call that started before the run's last
            # success proves nothing newer (calls of a group never overlap, so this is a guard).
            if started >= m.last_start:
                m.last_start = started
                m.trusted_until = started + self.lease_seconds - self.margin
            m.due = self._next_due(ended, m.trusted_until)


class LeaseKeeper:
    """Keeps one run's lease renewed with the other runs of its event loop and lease group.

    ``hold()`` (in a task of the run) returns True when the run must stop acting for the
    saga (see ``LeaseGroup.hold``); ``stop()`` when the run ends makes it return False at
    once (stopping before ``hold`` starts is fine: it then returns at once).
    """

    def __init__(self, store: SagaStore, fence: Fence, lease_seconds: float) -> None:
        self._store = store
        self._lease_seconds = lease_seconds
        self._member = _Member(fence, last_start=0.0, trusted_until=0.0)

    def stop(self) -> None:
        """The run ended: stop renewing its lease."""
        self._member.signal(stopped=True)

    async def hold(self) -> bool:
        """Renew until the lease is lost (True) or ``stop()`` is called (False)."""
        try:
            groups = _groups.get()
        except LookupError:
            groups = {}
            _groups.set(groups)
        key = (id(self._store), self._member.fence.owner, self._lease_seconds)
        group = groups.get(key)
        if group is None:
            group = groups[key] = LeaseGroup(
                self._store, self._member.fence.owner, self._lease_seconds
            )
        try:
            return await group.hold(self._member)
        finally:
            # Forget an empty group (the key holds a store's id, which a new store may reuse
            # once this one is gone); a group with a call in flight still has its leader as a
            # member.
            if not group.members and groups.get(key) is group:
                del groups[key]


async def keep_lease(store: SagaStore, fence: Fence, lease_seconds: float) -> None:
    """Keep ``fence``'s lease renewed together with the other runs of this event loop.

    Returns when the run must stop acting for the saga (see ``LeaseGroup.hold``); runs until
    cancelled otherwise.
    """
    await LeaseKeeper(store, fence, lease_seconds).hold()
