"""``fast_init`` gives a frozen, slotted dataclass an ``__init__`` that behaves exactly like the
generated one: same signature, values, defaults, fresh default factories, ``__post_init__``
(and its errors), and the instance stays frozen."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import sys
import typing
from dataclasses import FrozenInstanceError, InitVar, dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saga_core import Message, OutboxEvent, StepStatus
from saga_core._fast_init import fast_init
from saga_core.records import (
    ClaimedKey,
    Fence,
    NewSaga,
    OutboxRecord,
    SagaState,
    SagaWrite,
    StepState,
)


def _define(decorate: bool) -> type:
    @dataclass(frozen=True, slots=True)
    class Point:
        x: int
        label: str = "origin"
        tags: list[str] = field(default_factory=list)
        weight: float | None = None

        def __post_init__(self) -> None:
            if self.x < 0:
                raise ValueError(f"x must be >= 0, got {self.x}")

    return fast_init(Point) if decorate else Point


PLAIN, FAST = _define(False), _define(True)
VALUES = st.one_of(st.integers(-3, 3), st.text(max_size=3), st.none(), st.lists(st.text()))


def _build(cls: type, args: list[Any], kwargs: dict[str, Any]) -> tuple[str, Any]:
    try:
        obj = cls(*args, **kwargs)
    except Exception as exc:  # the same failure, by type and message
        return "raised", (type(exc), str(exc).replace(cls.__qualname__, "Point"))
    return "built", tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))


@given(
    args=st.lists(VALUES, max_size=5),
    kwargs=st.dictionaries(st.sampled_from(["x", "label", "tags", "weight", "other"]), VALUES),
)
def test_fast_init_behaves_like_the_generated_init(args: list[Any], kwargs: dict[str, Any]) -> None:
    # Any call, valid or not: missing, repeated or unknown arguments, __post_init__ refusals.
    assert _build(FAST, args, kwargs) == _build(PLAIN, args, kwargs)


def test_signature_factories_frozenness_and_pickling_are_kept() -> None:
    assert inspect.signature(FAST) == inspect.signature(PLAIN)
    a, b = FAST(1), FAST(2)
    assert a.tags == [] and a.tags is not b.tags  # a fresh list per instance
    assert FAST(1, "p", ["t"], 0.5) == FAST(x=1, label="p", tags=["t"], weight=0.5)
    with pytest.raises(FrozenInstanceError):
        a.x = 3  # type: ignore[misc]
    step = StepState("s", attempts=2)  # a module-level class: the local ones cannot be pickled
    assert pickle.loads(pickle.dumps(step)) == step
    assert dataclasses.replace(a, label="moved") == FAST(1, "moved")


def test_what_it_cannot_reproduce_is_refused_at_definition() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        x: int

    @dataclass(slots=True)
    class NotFrozen:
        x: int

    @dataclass(frozen=True, slots=True)
    class KwOnly:
        x: int = field(kw_only=True)

    @dataclass(frozen=True, slots=True)
    class NotInInit:
        x: int = field(init=False, default=0)

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        x: int
        scale: InitVar[int]

    @dataclass(frozen=True, slots=True)
    class Clashing:  # a field named like the generated code's own names
        _set0: int

    for cls in (NoSlots, NotFrozen, KwOnly, NotInInit, WithInitVar, Clashing):
        with pytest.raises(TypeError, match=cls.__qualname__.split(".")[-1]):
            fast_init(cls)


HOT = [
    *(Message, OutboxEvent, OutboxRecord, ClaimedKey),
    *(StepState, SagaState, NewSaga, Fence, SagaWrite),
]


@pytest.mark.parametrize("cls", HOT)
def test_the_hot_records_use_it_and_keep_their_fields(cls: type) -> None:
    """Each hot record's __init__ is the fast one, and takes exactly its fields, in order, with
    their defaults (what the dataclass decorator declared)."""
    assert cls.__init__.__module__ == cls.__module__
    assert "_set0" in cls.__init__.__code__.co_freevars  # stores through the slots
    # Its annotations resolve in the class's module, as the generated __init__'s do.
    assert cls.__init__.__globals__ is sys.modules[cls.__module__].__dict__
    hints = typing.get_type_hints(cls.__init__)
    assert hints == {**typing.get_type_hints(cls), "return": type(None)}
    assert inspect.signature(cls.__init__, eval_str=True).parameters["self"]
    params = list(inspect.signature(cls).parameters.values())
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        if f.default is not dataclasses.MISSING:
            assert p.default is f.default
        elif f.default_factory is dataclasses.MISSING:
            assert p.default is inspect.Parameter.empty


def test_outbox_event_still_validates() -> None:
    with pytest.raises(ValueError, match="event_type is required"):
        OutboxEvent(aggregate_type="order", aggregate_id="o-1")
    with pytest.raises(TypeError, match="payload"):
        OutboxEvent(aggregate_id="o-1", event_type="x", payload={"bad": object()})
    first, second = (OutboxEvent(aggregate_id="o-1", event_type="x") for _ in range(2))
    assert first.event_id != second.event_id  # the factory runs per event


_names = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FFF), min_size=1)


@given(
    aggregate_type=st.none() | _names,
    event_type=_names,
    topic=st.none() | _names,
    saga_id=_names,
    result=st.dictionaries(st.text(), st.integers() | st.text() | st.none(), max_size=4),
)
def test_a_step_event_built_unchecked_equals_the_checked_one(
    aggregate_type: str | None, event_type: str, topic: str | None, saga_id: str, result: Any
) -> None:
    """A saga step's event is built without ``__post_init__`` (its parts are checked where
    they enter): for any parts the checked constructor accepts, it is the same event, with
    every field set and a fresh id."""
    from saga_core.events import _checked_event

    payload = {"saga_id": saga_id, "step": "s", "result": result, "occurred_at": "t"}
    fast = _checked_event(aggregate_type, event_type, topic, saga_id, payload)
    checked = OutboxEvent(
        aggregate_type=aggregate_type,
        event_type=event_type,
        topic=topic,
        saga_id=saga_id,
        payload=payload,
        event_id=fast.event_id,
    )
    assert fast == checked
    assert [getattr(fast, f.name) for f in dataclasses.fields(OutboxEvent)] == [
        getattr(checked, f.name) for f in dataclasses.fields(OutboxEvent)
    ]
    assert fast.event_id != _checked_event(aggregate_type, event_type, topic, saga_id, {}).event_id


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.text(max_size=5),
            "status": st.sampled_from(list(StepStatus)),
            "outcome": st.none() | st.sampled_from(["succeeded", "unknown", "rejected"]),
            "attempts": st.integers(0, 9),
            "result": st.none() | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
            "crashes": st.integers(0, 9),
            "started_at": st.none() | st.floats(0, 1e10),
            "finished_at": st.none() | st.floats(0, 1e10),
        },
    )
)
def test_fast_replace_is_dataclasses_replace(changes: dict[str, Any]) -> None:
    """The engine's step-record replace gives what ``dataclasses.replace`` gives, for any
    subset of fields changed, and refuses an unknown field as it does."""
    from saga_core.records import _replace_step

    row = StepState("a", StepStatus.RUNNING, attempts=1, result={"x": 1}, started_at=1.0)
    assert _replace_step(row, **changes) == dataclasses.replace(row, **changes)
    with pytest.raises(TypeError):
        _replace_step(row, nope=1)
