"""Saga, step and outbox state machines (DESIGN.md sections 2 and 4).

The expected transitions are written out here from the design text, independently of
``saga_core.states``; the properties are:

* every ``(current, new)`` pair is accepted exactly when the design allows it, and an accepted
  transition returns ``new`` (checked exhaustively and on random walks);
* final saga statuses (``COMPLETED``, ``COMPENSATED``) and outbox ``SENT`` have no exits;
* ``FAILED`` can always be resolved by hand to ``COMPLETED`` or ``COMPENSATED``, and every status
  can still reach a final one (no trap states).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from enum import Enum
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saga_core.errors import IllegalTransition
from saga_core.states import (
    OUTBOX_TRANSITIONS,
    SAGA_TRANSITIONS,
    STEP_TRANSITIONS,
    OutboxStatus,
    SagaStatus,
    StepStatus,
    outbox_transition,
    saga_transition,
    step_transition,
)

S, T, Ob = SagaStatus, StepStatus, OutboxStatus

#: Section 2 "Statuses", plus PENDING -> COMPENSATING for ``cancel(saga_id)`` before the saga
#: started ("abort and compensate"; nothing is affected, so it ends COMPENSATED at once).
SAGA_ALLOWED: frozenset[tuple[SagaStatus, SagaStatus]] = frozenset(
    {
        (S.PENDING, S.RUNNING),
        (S.PENDING, S.COMPENSATING),
        (S.RUNNING, S.COMPLETED),
        (S.RUNNING, S.COMPENSATING),
        (S.RUNNING, S.FAILED),
        (S.COMPENSATING, S.COMPENSATED),
        (S.COMPENSATING, S.FAILED),
        (S.FAILED, S.RUNNING),
        (S.FAILED, S.COMPENSATING),
        (S.FAILED, S.COMPENSATED),
        (S.FAILED, S.COMPLETED),
    }
)

#: Section 2 "Statuses"; UNKNOWN -> RUNNING re-invokes a pivot whose outcome is unknown, and
#: COMPENSATING -> COMPENSATING is a compensation's next attempt (they are retried by default).
STEP_ALLOWED: frozenset[tuple[StepStatus, StepStatus]] = frozenset(
    {
        (T.PENDING, T.RUNNING),
        (T.RUNNING, T.RUNNING),
        (T.RUNNING, T.SUCCEEDED),
        (T.RUNNING, T.REJECTED),
        (T.RUNNING, T.UNKNOWN),
        (T.UNKNOWN, T.RUNNING),
        (T.SUCCEEDED, T.COMPENSATING),
        (T.UNKNOWN, T.COMPENSATING),
        (T.COMPENSATING, T.COMPENSATING),
        (T.COMPENSATING, T.COMPENSATED),
        (T.COMPENSATING, T.COMPENSATION_FAILED),
        (T.COMPENSATION_FAILED, T.COMPENSATING),
    }
)

#: Section 4: sent, or dead after max attempts; ``replay`` resumes a dead event, ``skip`` is the
#: only way past it.
OUTBOX_ALLOWED: frozenset[tuple[OutboxStatus, OutboxStatus]] = frozenset(
    {(Ob.PENDING, Ob.SENT), (Ob.PENDING, Ob.DEAD), (Ob.DEAD, Ob.PENDING), (Ob.DEAD, Ob.SENT)}
)

E = TypeVar("E", bound=Enum)

MACHINES = [
    pytest.param(SagaStatus, saga_transition, SAGA_ALLOWED, SAGA_TRANSITIONS, id="saga"),
    pytest.param(StepStatus, step_transition, STEP_ALLOWED, STEP_TRANSITIONS, id="step"),
    pytest.param(OutboxStatus, outbox_transition, OUTBOX_ALLOWED, OUTBOX_TRANSITIONS, id="outbox"),
]


@pytest.mark.parametrize(("enum", "transition", "allowed", "table"), MACHINES)
def test_every_pair_is_accepted_exactly_when_the_design_allows_it(
    enum: type[E],
    transition: Callable[[E, E], E],
    allowed: frozenset[tuple[E, E]],
    table: Mapping[E, frozenset[E]],
) -> None:
    assert set(table) == set(enum), "the table covers every status"
    assert {(a, b) for a, targets in table.items() for b in targets} == allowed
    for current, new in itertools.product(enum, repeat=2):
        if (current, new) in allowed:
            assert transition(current, new) is new
        else:
            with pytest.raises(IllegalTransition) as info:
                transition(current, new)
            assert current.value in str(info.value)
            assert new.value in str(info.value)
            assert isinstance(info.value, RuntimeError)


Machine = tuple[type[Enum], Callable[..., Enum], frozenset[tuple[Enum, Enum]]]
MACHINE_TUPLES: list[Machine] = [
    (SagaStatus, saga_transition, SAGA_ALLOWED),
    (StepStatus, step_transition, STEP_ALLOWED),
    (OutboxStatus, outbox_transition, OUTBOX_ALLOWED),
]


@st.composite
def walks(draw: st.DrawFn) -> tuple[Machine, Enum, list[Enum]]:
    """A machine, a start status and a sequence of attempted target statuses."""
    machine = draw(st.sampled_from(MACHINE_TUPLES))
    statuses = list(machine[0])
    start = draw(st.sampled_from(statuses))
    return machine, start, draw(st.lists(st.sampled_from(statuses), max_size=30))


@settings(max_examples=200, deadline=None)
@given(walks())
def test_random_walks_follow_the_design(case: tuple[Machine, Enum, list[Enum]]) -> None:
    """Legal transitions move; illegal ones raise and leave the status where it was."""
    (_, transition, allowed), current, targets = case
    for new in targets:
        if (current, new) in allowed:
            current = transition(current, new)
            assert current is new
        else:
            with pytest.raises(IllegalTransition):
                transition(current, new)


@pytest.mark.parametrize("final", [S.COMPLETED, S.COMPENSATED])
def test_final_saga_statuses_have_no_exits(final: SagaStatus) -> None:
    assert final.is_final
    for new in SagaStatus:
        with pytest.raises(IllegalTransition):
            saga_transition(final, new)


def test_only_completed_and_compensated_are_final() -> None:
    assert {s for s in SagaStatus if s.is_final} == {S.COMPLETED, S.COMPENSATED}


def test_sent_outbox_event_has_no_exits() -> None:
    for new in OutboxStatus:
        with pytest.raises(IllegalTransition):
            outbox_transition(Ob.SENT, new)


@pytest.mark.parametrize("resolved", [S.COMPLETED, S.COMPENSATED])
def test_failed_saga_can_always_be_resolved_by_hand(resolved: SagaStatus) -> None:
    assert saga_transition(S.FAILED, resolved) is resolved


def test_failed_is_reachable_only_from_running_or_compensating() -> None:
    assert {a for a, b in SAGA_ALLOWED if b is S.FAILED} == {S.RUNNING, S.COMPENSATING}


SAGA_TRANSITIONS_PAIRS = {(a, b) for a, targets in SAGA_TRANSITIONS.items() for b in targets}
STEP_TRANSITIONS_PAIRS = {(a, b) for a, targets in STEP_TRANSITIONS.items() for b in targets}


def reachable(start: E, allowed: frozenset[tuple[E, E]]) -> set[E]:
    seen, todo = {start}, [start]
    while todo:
        current = todo.pop()
        for a, b in allowed:
            if a is current and b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


@pytest.mark.parametrize("status", list(SagaStatus))
def test_every_saga_status_can_still_end(status: SagaStatus) -> None:
    assert reachable(status, frozenset(SAGA_TRANSITIONS_PAIRS)) & {S.COMPLETED, S.COMPENSATED}


@pytest.mark.parametrize("status", list(StepStatus))
def test_every_step_status_can_still_settle(status: StepStatus) -> None:
    """A step settles as rejected, or compensated, or stays succeeded (saga completed)."""
    settled = {T.REJECTED, T.COMPENSATED, T.SUCCEEDED}
    assert reachable(status, frozenset(STEP_TRANSITIONS_PAIRS)) & settled
