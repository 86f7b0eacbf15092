"""The ports the engine talks to (DESIGN.md section 1). Storage and broker adapters implement them.

``saga_core`` depends only on these protocols, never on SQLAlchemy or a broker client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from saga_core.events import Message, OutboxEvent
from saga_core.records import ClaimedKey, Fence, NewSaga, SagaState, SagaWrite
from saga_core.states import SagaStatus

T = TypeVar("T")


@runtime_checkable
class SagaStore(Protocol):
    """Durable saga state. All methods are async and safe to call from many tasks at once."""

    async def create_saga(
        self, new: NewSaga, *, lease_owner: str | None, lease_seconds: float
    ) -> tuple[SagaState, Fence | None]:
        """Insert a saga and its PENDING steps, leased to ``lease_owner`` when given.

        Idempotent on ``saga_id``: when it exists with the same type and input, return it and
        ``None`` for the fence (someone else owns it); otherwise raise ``SagaConflict``.
        """
        ...

    async def load_saga(self, saga_id: str) -> SagaState:
        """The saga and its steps; ``SagaNotFound`` if there is none."""
        ...

    async def write(
        self, fence: Fence, change: SagaWrite, *, claim_events: bool = False
    ) -> Sequence[ClaimedKey]:
        """Apply ``change`` atomically after the fenced update; ``LeaseLost`` writes nothing.

        With ``claim_events``, an event that is next on an unclaimed key also claims it, and
        the claims are returned for publishing right after commit (optimistic path).
        """
        ...

    async def write_transactional(
        self,
        fence: Fence,
        action: Callable[[Any], T],
        finish: Callable[[T], SagaWrite],
        timeout: float | None = None,
    ) -> T:
        """Run ``action(connection)`` and then ``finish(result)``'s change in one transaction.

        Used by transactional steps: their own SQL commits exactly when their record does.
        ``timeout`` bounds their statements where the database supports it.
        """
        ...

    async def claim_saga(self, saga_id: str, owner: str, lease_seconds: float) -> Fence | None:
        """Lease a saga nobody holds (or whose lease expired), bumping its epoch; else ``None``."""
        ...

    async def renew_leases(
        self, owner: str, fences: Sequence[Fence], lease_seconds: float
    ) -> set[str]:
        """Extend these leases; returns the saga ids still held by ``owner`` at the same epoch."""
        ...

    async def claim_sagas(
        self,
        owner: str,
        known: Mapping[str, Sequence[str]],
        *,
        limit: int,
        lease_seconds: float,
    ) -> list[Fence]:
        """Lease sagas needing a worker (pending, lease expired, wake time passed), only of the
        ``known`` saga types and definition hashes; ``SKIP LOCKED`` where the database has it."""
        ...

    async def note_unknown_versions(self, owner: str, known: Mapping[str, Sequence[str]]) -> int:
        """Note on unsettled sagas of ``known`` types with another definition why they wait."""
        ...

    async def release(self, fence: Fence) -> None:
        """Give up the lease (the saga is finished or waits for another worker)."""
        ...

    async def list_sagas(
        self,
        *,
        status: SagaStatus | None = None,
        saga_type: str | None = None,
        older_than: float | None = None,
        limit: int = 100,
    ) -> list[SagaState]:
        """Sagas newest first, filtered by status, type and age in seconds."""
        ...


@runtime_checkable
class OutboxStore(Protocol):
    """Durable outbox rows, claimed by key so one key has one publisher at a time."""

    def append_outbox(
        self, event: OutboxEvent, *, conn: Any, claim: bool = False
    ) -> ClaimedKey | None:
        """Add ``event`` inside the caller's own transaction (``conn``: a SQLAlchemy Connection);
        with ``claim``, claim its key for publishing after commit when that keeps key order."""
        ...

    async def committed_claims(self, claims: Sequence[ClaimedKey]) -> list[ClaimedKey]:
        """The claims whose transaction committed."""
        ...

    async def claim_outbox(
        self, owner: str, *, max_keys: int, max_events: int, claim_seconds: float
    ) -> list[ClaimedKey]:
        """Claim up to ``max_keys`` keys with unsent events, each with events in ``seq`` order."""
        ...

    async def complete_outbox(
        self,
        claim: ClaimedKey,
        sent: int,
        error: str | None,
        *,
        retry_in: float,
        dead_after: int,
        follow: int = 0,
    ) -> ClaimedKey | None:
        """Record that the first ``sent`` events of ``claim`` were acknowledged, and the next one
        failed with ``error`` (when given): count an attempt, back the key off by ``retry_in``,
        mark it DEAD and block the key after ``dead_after`` attempts. Releases the claim, unless
        ``follow > 0``, all were sent and more events of the key are committed: then the claim
        is kept and those events (up to ``follow``) are returned."""
        ...

    async def complete_outbox_many(
        self,
        results: Sequence[tuple[ClaimedKey, int, str | None]],
        *,
        retry_in: float,
        dead_after: int,
        follow: int = 0,
    ) -> list[ClaimedKey]:
        """``complete_outbox`` for many claims ``(claim, sent, error)``; returns the follow-up
        claims. As few transactions as can be without ever waiting for a lock while holding
        another (a writer appending to several keys must not deadlock with it): all keys at
        once, and one at a time only those a writer holds right then."""
        ...

    async def release_outbox(self, claim: ClaimedKey, *, retry_in: float) -> None:
        """Give the key back without counting an attempt (the broker was unavailable)."""
        ...


@runtime_checkable
class Broker(Protocol):
    """A message broker. ``publish`` returns once the broker acknowledged storing the messages."""

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        """Publish in order. Returns, per message, ``None`` (acknowledged) or the error that
        refused it (``PublishFailed``). Raises ``BrokerUnavailable`` when the broker cannot be
        reached at all: then nothing may be assumed sent.

        Messages sharing a key keep their order: once one of them is refused, the adapter must
        not deliver the later messages of that key from the same batch (it reports them refused
        too), or a consumer could see event n+1 before the retried event n.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and threads."""
        ...
