"""Saga, step and outbox statuses as explicit transition tables (pure; DESIGN.md section 2).

An illegal transition raises :class:`IllegalTransition`, which always means a bug or a writer
that should have been fenced out.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import TypeVar

from saga_core.errors import IllegalTransition


class SagaStatus(str, Enum):
    """Where a saga is in its life."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"

    @property
    def is_final(self) -> bool:
        """Completed or compensated: nothing more will happen. ``FAILED`` waits for an operator."""
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)


class StepStatus(str, Enum):
    """Where one step (and then its compensation) is."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    REJECTED = "REJECTED"
    UNKNOWN = "UNKNOWN"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"


class OutboxStatus(str, Enum):
    """Where one outbox event is."""

    PENDING = "PENDING"
    SENT = "SENT"
    DEAD = "DEAD"


_S = SagaStatus
SAGA_TRANSITIONS: Mapping[SagaStatus, frozenset[SagaStatus]] = {
    _S.PENDING: frozenset({_S.RUNNING, _S.COMPENSATING}),  # COMPENSATING: cancelled before start
    _S.RUNNING: frozenset({_S.COMPLETED, _S.COMPENSATING, _S.FAILED}),
    _S.COMPENSATING: frozenset({_S.COMPENSATED, _S.FAILED}),
    _S.FAILED: frozenset({_S.RUNNING, _S.COMPENSATING, _S.COMPENSATED, _S.COMPLETED}),
    _S.COMPLETED: frozenset(),
    _S.COMPENSATED: frozenset(),
}

_T = StepStatus
STEP_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    _T.PENDING: frozenset({_T.RUNNING}),
    # RUNNING -> RUNNING is the next attempt.
    _T.RUNNING: frozenset({_T.RUNNING, _T.SUCCEEDED, _T.REJECTED, _T.UNKNOWN}),
    _T.SUCCEEDED: frozenset({_T.COMPENSATING}),
    _T.UNKNOWN: frozenset({_T.COMPENSATING, _T.RUNNING}),  # RUNNING: a pivot re-invoked
    _T.REJECTED: frozenset(),
    _T.COMPENSATING: frozenset({_T.COMPENSATING, _T.COMPENSATED, _T.COMPENSATION_FAILED}),
    _T.COMPENSATED: frozenset(),
    _T.COMPENSATION_FAILED: frozenset({_T.COMPENSATING}),
}

_O = OutboxStatus
OUTBOX_TRANSITIONS: Mapping[OutboxStatus, frozenset[OutboxStatus]] = {
    _O.PENDING: frozenset({_O.SENT, _O.DEAD}),
    _O.DEAD: frozenset({_O.PENDING, _O.SENT}),  # replay, or skip (marked sent without publishing)
    _O.SENT: frozenset(),
}

_E = TypeVar("_E", SagaStatus, StepStatus, OutboxStatus)


def _check(table: Mapping[_E, frozenset[_E]], what: str, current: _E, new: _E) -> _E:
    if new not in table[current]:
        raise IllegalTransition(f"{what} cannot go from {current.value} to {new.value}")
    return new


def saga_transition(current: SagaStatus, new: SagaStatus) -> SagaStatus:
    """``new`` if a saga may go there from ``current``, else raise ``IllegalTransition``."""
    return _check(SAGA_TRANSITIONS, "saga", current, new)


def step_transition(current: StepStatus, new: StepStatus) -> StepStatus:
    """``new`` if a step may go there from ``current``, else raise ``IllegalTransition``."""
    return _check(STEP_TRANSITIONS, "step", current, new)


def outbox_transition(current: OutboxStatus, new: OutboxStatus) -> OutboxStatus:
    """Return ``new`` if an outbox event may go there; raise ``IllegalTransition`` if not."""
    return _check(OUTBOX_TRANSITIONS, "outbox event", current, new)
