"""What the storage keeps about a saga, as immutable values shared by the engine and the stores."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from saga_core._fast_init import fast_init, fast_replace
from saga_core.errors import ErrorRecord
from saga_core.events import OutboxEvent
from saga_core.states import OutboxStatus, SagaStatus, StepStatus

SUCCEEDED = "succeeded"
UNKNOWN = "unknown"
REJECTED = "rejected"


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


@fast_init
@dataclass(frozen=True, slots=True)
class StepState:
    """One step of one saga as stored.

    ``outcome`` keeps what the forward step did (``succeeded``, ``unknown`` or ``rejected``) after
    its status has moved on to compensation. Timestamps are UTC epoch seconds; the ``*_time``
    properties give aware datetimes.
    """

    name: str
    status: StepStatus = StepStatus.PENDING
    outcome: str | None = None
    attempts: int = 0
    result: Any = None
    error: ErrorRecord | None = None
    crashes: int = 0
    compensation_attempts: int = 0
    compensation_error: ErrorRecord | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def started_time(self) -> datetime | None:
        """When the last attempt started."""
        return _dt(self.started_at)

    @property
    def finished_time(self) -> datetime | None:
        """When the step (or its compensation) last finished."""
        return _dt(self.finished_at)


#: ``dataclasses.replace`` for a ``StepState`` (the engine's hot path), at half its cost.
_replace_step = fast_replace(StepState)


@fast_init
@dataclass(frozen=True, slots=True)
class SagaState:
    """A saga as stored: what ``orchestrator.get(saga_id)`` returns.

    ``steps`` is in declaration order. ``reason`` says why a saga is ``FAILED``
    (``compensation_failed``, ``forward_stuck``, ``crash_loop``...). ``failed_step`` and ``error``
    describe the forward failure that started compensation.
    """

    saga_id: str
    saga_type: str
    definition_hash: str
    status: SagaStatus
    input: Mapping[str, Any]
    steps: Mapping[str, StepState]
    reason: str | None = None
    failed_step: str | None = None
    error: ErrorRecord | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    lease_owner: str | None = None
    lease_epoch: int = 0
    lease_until: float | None = None
    wake_at: float | None = None
    note: str | None = None

    @property
    def created_time(self) -> datetime:
        """When the saga was created."""
        return datetime.fromtimestamp(self.created_at, tz=timezone.utc)

    @property
    def updated_time(self) -> datetime:
        """When the saga row last changed."""
        return datetime.fromtimestamp(self.updated_at, tz=timezone.utc)


@fast_init
@dataclass(frozen=True, slots=True)
class NewSaga:
    """A saga about to be inserted, with one PENDING row per step, except the steps in
    ``opened``, whose first attempt is recorded right away when the saga is leased to its
    creator (one transaction fewer per saga)."""

    saga_id: str
    saga_type: str
    definition_hash: str
    input: Mapping[str, Any]
    step_names: tuple[str, ...]
    opened: tuple[str, ...] = ()


@fast_init
@dataclass(frozen=True, slots=True)
class Fence:
    """Proof of ownership: every write for a saga is guarded by its owner and lease epoch."""

    saga_id: str
    owner: str
    epoch: int


@fast_init
@dataclass(frozen=True, slots=True)
class SagaWrite:
    """One atomic change for one saga: optional saga status, whole step rows, outbox events.

    Stores apply it in one transaction that first runs the fenced update of the saga row, then
    the step rows, then the outbox rows (the lock order of DESIGN.md section 3).
    """

    status: SagaStatus | None = None
    reason: str | None = None
    failed_step: str | None = None
    error: ErrorRecord | None = None
    steps: tuple[StepState, ...] = ()
    events: tuple[OutboxEvent, ...] = field(default_factory=tuple)
    #: Drop the lease in the same transaction (with a final status).
    release_lease: bool = False
    #: An operator's note, or why the saga waits (stored with a status change).
    note: str | None = None
    #: Drop the lease and let a worker resume the saga after this many seconds (no status).
    wake_in: float | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One stored outbox event."""

    id: int
    event_id: str
    topic: str
    key: str
    seq: int
    event_type: str
    payload: str
    headers: Mapping[str, str]
    status: OutboxStatus
    attempts: int
    created_at: float
    last_error: str | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class ClaimedKey:
    """A key the relay owns for a while, with its next events in sequence order."""

    key: str
    token: str
    events: tuple[OutboxRecord, ...]


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """What ``saga outbox stats`` shows."""

    pending: int
    sent: int
    dead: int
    claimed_keys: int
    blocked_keys: int
    #: Seconds since the oldest pending event was committed (None: nothing pending).
    oldest_pending_age: float | None
