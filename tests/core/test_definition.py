"""Declaring sagas: ``@step``, ``@compensate``, ``DeclarativeSaga`` and their validation.

Every broken definition must fail when the class is created, with a ``SagaDefinitionError`` (a
``ValueError``) whose ``.steps`` and message name the offenders. The property test builds saga
classes from random specs and checks the class is accepted exactly when the reference model of
section 2 accepts it, with the model's precedence, the forward ancestors and a valid order.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga_core.definition import DeclarativeSaga, compensate, step
from saga_core.errors import SagaDefinitionError, StepRejected
from saga_core.retry import RetryPolicy
from tests.core.strategies import (
    SagaSpec,
    build_saga_class,
    expected_compensation,
    is_cycle_in,
    reach,
    saga_specs,
)

Ctx = Any


class OrderPlacementSaga(DeclarativeSaga):
    """The user's example (DESIGN.md section 9)."""

    saga_type = "core-tests-order-placement"

    @step(name="create_order", aggregate_type="order")
    async def create_order(self, ctx: Ctx) -> dict[str, Any]:
        return {"order_id": "o-1"}

    @compensate("create_order")
    async def cancel_order(self, ctx: Ctx) -> None:
        return None

    @step(
        name="charge_payment",
        depends_on=["create_order"],
        retry=RetryPolicy(max_attempts=3),
        timeout=5.0,
    )
    def charge_payment(self, ctx: Ctx) -> dict[str, Any]:
        return {"charge_id": "c-1"}

    @compensate("charge_payment", depends_on=["create_order"])
    async def refund_payment(self, ctx: Ctx) -> None:
        return None


def refusal(info: pytest.ExceptionInfo[SagaDefinitionError], *names: str) -> None:
    """The error is a ValueError and names every one of ``names`` in ``.steps`` and message."""
    assert isinstance(info.value, ValueError)
    assert set(names) <= set(info.value.steps), info.value.steps
    assert all(n in str(info.value) for n in names), str(info.value)


# --------------------------------------------------------------------------- accepted


def test_user_order_saga() -> None:
    d = OrderPlacementSaga.definition()
    assert d.saga_type == "core-tests-order-placement"
    assert d.step_names == ("create_order", "charge_payment")
    assert d.order == ("create_order", "charge_payment")
    assert d.pivot is None
    assert d.ancestors == {"create_order": (), "charge_payment": ("create_order",)}
    create, charge = d.step("create_order"), d.step("charge_payment")
    assert create.is_async
    assert not charge.is_async
    assert create.aggregate_type == "order"
    assert create.event_type == "create_order_completed"
    assert create.retry.max_attempts == 1  # a step runs once unless told otherwise
    assert charge.retry == RetryPolicy(max_attempts=3)
    assert charge.timeout == 5.0
    assert charge.kind == "compensatable"
    assert create.compensation is not None
    assert charge.compensation is not None
    assert create.compensation.attr == "cancel_order"
    assert charge.compensation.attr == "refund_payment"
    assert charge.compensation.depends_on == ("create_order",)
    assert charge.compensation.is_async
    assert charge.compensation.event_type == "charge_payment_compensated"
    assert d.graph.precedence == {("create_order", "charge_payment")}
    assert d.graph.dropped == {("charge_payment", "create_order")}
    assert d.version == d.graph.fingerprint()
    with pytest.raises(KeyError):
        d.step("nope")


def test_compensations_are_retried_by_default_and_give_up_within_about_30_seconds() -> None:
    comp = OrderPlacementSaga.definition().step("create_order").compensation
    assert comp is not None
    policy = comp.retry
    assert policy.max_attempts is not None
    assert policy.max_attempts > 1
    waits = sum(
        min(policy.max_backoff, policy.backoff * policy.multiplier ** (n - 1))
        for n in range(1, policy.max_attempts)
    )
    assert waits <= 30


def test_sync_and_async_methods_are_detected() -> None:
    class Mixed(DeclarativeSaga):
        saga_type = "core-tests-mixed"

        @step()
        def plain(self, ctx: Ctx) -> None:
            return None

        @compensate("plain")
        async def undo_plain(self, ctx: Ctx) -> None:
            return None

        @step()
        async def coro(self, ctx: Ctx) -> None:
            return None

        @compensate("coro")
        def undo_coro(self, ctx: Ctx) -> None:
            return None

    d = Mixed.definition()
    assert not d.step("plain").is_async
    assert d.step("coro").is_async
    assert d.step("plain").compensation.is_async  # type: ignore[union-attr]
    assert not d.step("coro").compensation.is_async  # type: ignore[union-attr]


def test_step_name_defaults_to_the_method_name() -> None:
    class Named(DeclarativeSaga):
        saga_type = "core-tests-named"

        @step()
        def first(self, ctx: Ctx) -> None:
            return None

        @step("second_step", depends_on="first")
        def whatever(self, ctx: Ctx) -> None:
            return None

    d = Named.definition()
    assert d.step_names == ("first", "second_step")
    assert d.step("second_step").attr == "whatever"


def test_depends_on_as_a_single_string_is_one_name() -> None:
    class Single(DeclarativeSaga):
        saga_type = "core-tests-single"

        @step()
        def alpha(self, ctx: Ctx) -> None:
            return None

        @step(depends_on="alpha")
        def beta(self, ctx: Ctx) -> None:
            return None

        @compensate("beta", depends_on="alpha")
        def undo_beta(self, ctx: Ctx) -> None:
            return None

        @compensate("alpha")
        def undo_alpha(self, ctx: Ctx) -> None:
            return None

    d = Single.definition()
    assert d.step("beta").depends_on == ("alpha",)
    assert d.step("beta").compensation.depends_on == ("alpha",)  # type: ignore[union-attr]


def test_saga_type_defaults_to_the_class_name() -> None:
    class CoreTestsDefaultName(DeclarativeSaga):
        @step()
        def only(self, ctx: Ctx) -> None:
            return None

    assert CoreTestsDefaultName.saga_type == "CoreTestsDefaultName"
    assert CoreTestsDefaultName.definition().saga_type == "CoreTestsDefaultName"


def test_saga_type_is_not_inherited_from_the_parent() -> None:
    class CoreTestsChild(OrderPlacementSaga):
        pass

    assert OrderPlacementSaga.definition().saga_type == "core-tests-order-placement"
    assert CoreTestsChild.definition().saga_type == "CoreTestsChild"


@pytest.mark.parametrize("bad", ["", 42])
def test_saga_type_must_be_a_non_empty_str(bad: object) -> None:
    with pytest.raises(SagaDefinitionError):

        class BadType(DeclarativeSaga):
            saga_type = bad  # type: ignore[assignment]

            @step()
            def only(self, ctx: Ctx) -> None:
                return None


def test_subclass_adds_a_step() -> None:
    class CoreTestsWithShipping(OrderPlacementSaga):
        saga_type = "core-tests-with-shipping"

        @step(depends_on=["charge_payment"])
        def ship(self, ctx: Ctx) -> None:
            return None

        @compensate("ship")
        def unship(self, ctx: Ctx) -> None:
            return None

    d = CoreTestsWithShipping.definition()
    assert d.step_names == ("create_order", "charge_payment", "ship")
    # ship is undone before the charge; the refund still waits for the cancellation.
    assert d.graph.precedence == {("ship", "charge_payment"), ("create_order", "charge_payment")}
    assert OrderPlacementSaga.definition().step_names == ("create_order", "charge_payment")
    assert d.version != OrderPlacementSaga.definition().version


def test_subclass_override_replaces_the_step() -> None:
    class CoreTestsRetryingCharge(OrderPlacementSaga):
        saga_type = "core-tests-retrying-charge"

        @step(name="charge_payment", depends_on=["create_order"], retry=RetryPolicy(5))
        async def charge_payment(self, ctx: Ctx) -> dict[str, Any]:  # type: ignore[override]
            return {"charge_id": "c-2"}

    d = CoreTestsRetryingCharge.definition()
    assert sorted(d.step_names) == ["charge_payment", "create_order"]
    charge = d.step("charge_payment")
    assert charge.retry.max_attempts == 5
    assert charge.is_async
    assert charge.timeout is None
    assert charge.compensation is not None  # the inherited compensation still applies
    assert charge.compensation.attr == "refund_payment"
    assert OrderPlacementSaga.definition().step("charge_payment").retry.max_attempts == 3


def test_class_without_steps_has_no_definition() -> None:
    class CoreTestsEmpty(DeclarativeSaga):
        pass

    with pytest.raises(SagaDefinitionError, match="CoreTestsEmpty"):
        CoreTestsEmpty.definition()
    with pytest.raises(SagaDefinitionError):
        DeclarativeSaga.definition()


def test_valid_pivot_saga() -> None:
    class Pivoted(DeclarativeSaga):
        saga_type = "core-tests-pivoted"

        @step()
        def reserve(self, ctx: Ctx) -> None:
            return None

        @compensate("reserve")
        def release(self, ctx: Ctx) -> None:
            return None

        @step()
        def validate(self, ctx: Ctx) -> None:  # compensatable kind without a compensation
            return None

        @step(kind="pivot", depends_on=["reserve", "validate"])
        def charge(self, ctx: Ctx) -> None:
            return None

        @step(kind="retriable", depends_on=["charge"])
        def ship(self, ctx: Ctx) -> None:
            return None

        @step(kind="retriable", depends_on=["ship"], retry=RetryPolicy(max_attempts=4))
        def notify(self, ctx: Ctx) -> None:
            return None

    d = Pivoted.definition()
    assert d.pivot == "charge"
    assert d.step("charge").kind == "pivot"
    assert d.step("charge").retry.max_attempts == 1
    assert d.step("ship").retry.max_attempts is None  # retriable: unbounded by default
    assert d.step("notify").retry.max_attempts == 4
    assert d.ancestors["notify"] == ("reserve", "validate", "charge", "ship")


def test_retriable_steps_without_pivot_after_every_compensatable_step() -> None:
    class Tail(DeclarativeSaga):
        saga_type = "core-tests-tail"

        @step()
        def a(self, ctx: Ctx) -> None:
            return None

        @step()
        def b(self, ctx: Ctx) -> None:
            return None

        @compensate("b")
        def undo_b(self, ctx: Ctx) -> None:
            return None

        @step(kind="retriable", depends_on=["a", "b"])
        def r(self, ctx: Ctx) -> None:
            return None

    assert Tail.definition().pivot is None


def test_transactional_sync_step_is_accepted() -> None:
    class Tx(DeclarativeSaga):
        saga_type = "core-tests-tx"

        @step(transactional=True)
        def write(self, ctx: Ctx) -> None:
            return None

    assert Tx.definition().step("write").transactional


def test_clean_failures() -> None:
    class Clean(DeclarativeSaga):
        saga_type = "core-tests-clean"

        @step(clean_failures=[KeyError])
        def picky(self, ctx: Ctx) -> None:
            return None

        @step(compensate_on_failure=False)
        def never(self, ctx: Ctx) -> None:
            return None

        @step()
        def default(self, ctx: Ctx) -> None:
            return None

    d = Clean.definition()
    assert d.step("picky").is_clean_failure(KeyError("x"))
    assert not d.step("picky").is_clean_failure(ValueError("x"))
    assert d.step("picky").is_clean_failure(StepRejected("declined"))
    assert d.step("never").is_clean_failure(TimeoutError())
    assert d.step("default").is_clean_failure(StepRejected("declined"))
    assert not d.step("default").is_clean_failure(TimeoutError())


# --------------------------------------------------------------------------- refused


def test_duplicate_step_names() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class Dupes(DeclarativeSaga):
            @step(name="same")
            def one(self, ctx: Ctx) -> None:
                return None

            @step(name="same")
            def two(self, ctx: Ctx) -> None:
                return None

    refusal(info, "same")


def test_unknown_depends_on() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class Unknown(DeclarativeSaga):
            @step(depends_on=["ghost"])
            def one(self, ctx: Ctx) -> None:
                return None

    refusal(info, "one")
    assert "ghost" in str(info.value)


def test_forward_cycle() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class Loop(DeclarativeSaga):
            @step(depends_on="b")
            def a(self, ctx: Ctx) -> None:
                return None

            @step(depends_on="a")
            def b(self, ctx: Ctx) -> None:
                return None

    refusal(info, "a", "b")


def test_compensation_for_unknown_step() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class Orphan(DeclarativeSaga):
            @step()
            def real(self, ctx: Ctx) -> None:
                return None

            @compensate("ghost")
            def undo_ghost(self, ctx: Ctx) -> None:
                return None

    refusal(info, "ghost")


def test_two_compensations_for_one_step() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class Twice(DeclarativeSaga):
            @step()
            def a(self, ctx: Ctx) -> None:
                return None

            @compensate("a")
            def undo_one(self, ctx: Ctx) -> None:
                return None

            @compensate("a")
            def undo_two(self, ctx: Ctx) -> None:
                return None

    refusal(info, "a")
    assert "undo_one" in str(info.value)
    assert "undo_two" in str(info.value)


@pytest.mark.parametrize("kind", ["pivot", "retriable"])
def test_pivot_and_retriable_steps_cannot_have_a_compensation(kind: str) -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class Kinded(DeclarativeSaga):
            @step(kind=kind)  # type: ignore[arg-type]
            def a(self, ctx: Ctx) -> None:
                return None

            @compensate("a")
            def undo_a(self, ctx: Ctx) -> None:
                return None

    refusal(info, "a")


def test_two_pivots() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class TwoPivots(DeclarativeSaga):
            @step(kind="pivot")
            def p1(self, ctx: Ctx) -> None:
                return None

            @step(kind="pivot", depends_on="p1")
            def p2(self, ctx: Ctx) -> None:
                return None

    refusal(info, "p1", "p2")


def test_compensatable_step_parallel_to_the_pivot_names_both() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class Parallel(DeclarativeSaga):
            @step()
            def before(self, ctx: Ctx) -> None:
                return None

            @compensate("before")
            def undo_before(self, ctx: Ctx) -> None:
                return None

            @step()
            def beside(self, ctx: Ctx) -> None:
                return None

            @compensate("beside")
            def undo_beside(self, ctx: Ctx) -> None:
                return None

            @step(kind="pivot", depends_on="before")
            def pivot(self, ctx: Ctx) -> None:
                return None

    refusal(info, "beside", "pivot")
    assert "before" not in info.value.steps


def test_compensatable_step_after_the_pivot_names_both() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class After(DeclarativeSaga):
            @step(kind="pivot")
            def pivot(self, ctx: Ctx) -> None:
                return None

            @step(depends_on="pivot")
            def later(self, ctx: Ctx) -> None:
                return None

            @compensate("later")
            def undo_later(self, ctx: Ctx) -> None:
                return None

    refusal(info, "later", "pivot")


def test_retriable_step_not_after_the_pivot() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class EarlyRetriable(DeclarativeSaga):
            @step()
            def a(self, ctx: Ctx) -> None:
                return None

            @compensate("a")
            def undo_a(self, ctx: Ctx) -> None:
                return None

            @step(kind="pivot", depends_on="a")
            def p(self, ctx: Ctx) -> None:
                return None

            @step(kind="retriable", depends_on="a")
            def r(self, ctx: Ctx) -> None:
                return None

    refusal(info, "r", "p")


def test_retriable_step_without_pivot_not_after_every_compensatable_step() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class Unordered(DeclarativeSaga):
            @step()
            def a(self, ctx: Ctx) -> None:
                return None

            @compensate("a")
            def undo_a(self, ctx: Ctx) -> None:
                return None

            @step()
            def b(self, ctx: Ctx) -> None:
                return None

            @compensate("b")
            def undo_b(self, ctx: Ctx) -> None:
                return None

            @step(kind="retriable", depends_on="a")
            def r(self, ctx: Ctx) -> None:
                return None

    refusal(info, "r", "b")
    assert "a" not in info.value.steps


def test_transactional_async_step() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class AsyncTx(DeclarativeSaga):
            @step(transactional=True)
            async def write(self, ctx: Ctx) -> None:
                return None

    refusal(info, "write")


def test_explicit_compensation_cycle_names_it() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class CompLoop(DeclarativeSaga):
            @step()
            def a(self, ctx: Ctx) -> None:
                return None

            @compensate("a", depends_on="b")
            def undo_a(self, ctx: Ctx) -> None:
                return None

            @step()
            def b(self, ctx: Ctx) -> None:
                return None

            @compensate("b", depends_on="a")
            def undo_b(self, ctx: Ctx) -> None:
                return None

    refusal(info, "a", "b")


def test_mixed_compensation_cycle_names_it() -> None:
    with pytest.raises(SagaDefinitionError) as info:

        class Mixed(DeclarativeSaga):
            @step()
            def a(self, ctx: Ctx) -> None:
                return None

            @compensate("a")
            def undo_a(self, ctx: Ctx) -> None:
                return None

            @step(depends_on="a")
            def b(self, ctx: Ctx) -> None:
                return None

            @compensate("b")
            def undo_b(self, ctx: Ctx) -> None:
                return None

            @step(depends_on="b")
            def c(self, ctx: Ctx) -> None:
                return None

            @compensate("c", depends_on="a")
            def undo_c(self, ctx: Ctx) -> None:
                return None

    refusal(info, "a", "b", "c")


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_bad_timeout(timeout: float) -> None:
    with pytest.raises(SagaDefinitionError, match="timeout"):
        step(timeout=timeout)
    with pytest.raises(SagaDefinitionError, match="timeout"):
        compensate("a", timeout=timeout)


def test_bad_kind() -> None:
    with pytest.raises(SagaDefinitionError, match="kind"):
        step(kind="optional")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retry": 3},
        {"clean_failures": ["KeyError"]},
        {"clean_failures": [int]},
        {"depends_on": ["ok", ""]},
        {"depends_on": [1]},
    ],
)
def test_bad_step_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SagaDefinitionError):
        step(**kwargs)


@pytest.mark.parametrize("field", ["name", "aggregate_type", "event_type", "topic"])
@pytest.mark.parametrize("bad", ["order\ud800", "order\x00", b"orders", 7])
def test_text_a_step_would_store_is_checked_at_definition(field: str, bad: object) -> None:
    """A step's event fields go into rows and messages once the step has run: text they could
    not hold (not a str, a lone surrogate, a NUL) is refused when the saga is defined, naming it,
    rather than after the step acted."""
    problem = "(must be a str|is not valid Unicode|contains a NUL)"
    with pytest.raises(SagaDefinitionError, match=f"{field} {problem}"):
        step(**{field: bad})
    if field == "event_type":
        with pytest.raises(SagaDefinitionError, match="event_type"):
            compensate("a", event_type=bad)  # type: ignore[arg-type]
    step(**{field: "grüße-orders"})  # any valid text is fine


def test_a_saga_type_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(SagaDefinitionError, match="saga_type is not valid Unicode"):

        class BadText(DeclarativeSaga):
            saga_type = "orders\udfff"

            @step()
            def only(self, ctx: Ctx) -> None:
                return None


# --------------------------------------------------------------------------- property


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(saga_specs(), st.data())
def test_saga_classes_follow_the_reference_model(spec: SagaSpec, data: st.DataObject) -> None:
    async_steps = data.draw(st.sets(st.sampled_from(spec.steps)))

    def make_action(name: str) -> Any:
        if name in async_steps:

            async def action(self: Any, ctx: Ctx) -> None:
                return None

            return action

        def sync_action(self: Any, ctx: Ctx) -> None:
            return None

        return sync_action

    expected = expected_compensation(spec)
    attrs = {"saga_type": "core-tests-generated"}
    if not expected.accepted:
        with pytest.raises(SagaDefinitionError) as info:
            build_saga_class(spec, make_action=make_action, attrs=attrs)
        edges = expected.explicit if expected.explicit_cycle else expected.union
        assert is_cycle_in(info.value.steps, edges)
        return
    d = build_saga_class(spec, make_action=make_action, attrs=attrs).definition()
    assert d.step_names == spec.steps
    assert d.graph.precedence == expected.precedence
    assert d.version == d.graph.fingerprint()
    assert d.pivot is None
    assert sorted(d.order) == sorted(spec.steps)
    position = {s: i for i, s in enumerate(d.order)}
    assert all(position[dep] < position[s] for dep, s in spec.forward_edges)
    forward = reach(spec.steps, spec.forward_edges)
    for s in spec.steps:
        sd = d.step(s)
        assert sd.is_async == (s in async_steps)
        assert (sd.compensation is not None) == (s in spec.compensatable)
        assert set(d.ancestors[s]) == {t for t, u in forward if u == s}
        assert list(d.ancestors[s]) == [t for t in d.order if t in d.ancestors[s]]
        # What a run reads instead of scanning the steps: direct dependents in forward order,
        # the steps without dependencies, whether any step needs a worker thread.
        assert list(d.dependents[s]) == [t for t in d.order if s in spec.depends_on.get(t, ())]
    assert d.roots == tuple(s for s in spec.steps if not spec.depends_on.get(s))
    # (the generated compensations are sync functions)
    assert d.uses_threads == (set(async_steps) != set(spec.steps) or bool(spec.compensatable))
