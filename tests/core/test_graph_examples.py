"""Worked examples of the compensation graph (DESIGN.md section 2), each checked edge by edge.

They pin the cases the design singles out: the user's order saga (an explicit order overriding
the default reverse order), chains with and without compensations in the middle (the default
edge jumps over steps outside ``K`` and the closure keeps order when a middle step is skipped),
a diamond, refused definitions naming their offenders, and the stability of the fingerprint
across interpreter runs (it is stored with every saga as the definition version).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

from saga_core.errors import SagaDefinitionError
from saga_core.graph import (
    SagaCompensationGraph,
    closure,
    default_edges,
    find_cycle,
    topological_order,
    validate_forward,
)
from tests.core.strategies import is_cycle_in

ROOT = Path(__file__).resolve().parents[2]


def build(
    steps: Sequence[str],
    depends_on: Mapping[str, Sequence[str]],
    compensatable: Iterable[str] | None = None,
    explicit: Mapping[str, Sequence[str]] | None = None,
) -> SagaCompensationGraph:
    return SagaCompensationGraph.build(
        steps, depends_on, steps if compensatable is None else compensatable, explicit or {}
    )


def refused(
    steps: Sequence[str],
    depends_on: Mapping[str, Sequence[str]],
    compensatable: Iterable[str] | None = None,
    explicit: Mapping[str, Sequence[str]] | None = None,
) -> SagaDefinitionError:
    with pytest.raises(SagaDefinitionError) as info:
        build(steps, depends_on, compensatable, explicit)
    assert isinstance(info.value, ValueError)
    return info.value


# --------------------------------------------------------------------------- accepted


def test_user_order_saga_explicit_order_overrides_the_default() -> None:
    g = build(
        ["create_order", "charge_payment"],
        {"charge_payment": ["create_order"]},
        explicit={"charge_payment": ["create_order"]},
    )
    assert g.explicit == {("create_order", "charge_payment")}
    assert g.defaults == frozenset()
    assert g.dropped == {("charge_payment", "create_order")}
    assert g.precedence == {("create_order", "charge_payment")}
    assert g.predecessors("charge_payment") == {"create_order"}
    assert g.predecessors("create_order") == frozenset()
    both = ["create_order", "charge_payment"]
    assert g.compensation_levels(both) == [["create_order"], ["charge_payment"]]
    assert g.ready(both, []) == ["create_order"]
    assert g.ready(both, ["create_order"]) == ["charge_payment"]
    assert g.ready(["charge_payment"], []) == ["charge_payment"]  # cancel skipped: refund runs


def test_user_order_saga_without_override_undoes_the_later_step_first() -> None:
    g = build(["create_order", "charge_payment"], {"charge_payment": ["create_order"]})
    assert g.defaults == {("charge_payment", "create_order")}
    assert g.dropped == frozenset()
    assert g.precedence == {("charge_payment", "create_order")}
    assert g.compensation_levels(["create_order", "charge_payment"]) == [
        ["charge_payment"],
        ["create_order"],
    ]


def test_chain_all_compensatable_is_undone_in_reverse() -> None:
    g = build(["a", "b", "c"], {"b": ["a"], "c": ["b"]})
    assert g.defaults == {("c", "b"), ("b", "a")}  # no c -> a: b (in K) lies between
    assert g.precedence == {("c", "b"), ("b", "a"), ("c", "a")}
    assert g.compensation_levels("abc") == [["c"], ["b"], ["a"]]


def test_chain_with_middle_step_skipped_keeps_its_order() -> None:
    """b never ran (so it is not affected): c still waits for nothing, a still waits for c."""
    g = build(["a", "b", "c"], {"b": ["a"], "c": ["b"]})
    assert g.ready(["a", "c"], []) == ["c"]
    assert g.ready(["a", "c"], ["c"]) == ["a"]
    assert g.compensation_levels(["a", "c"]) == [["c"], ["a"]]


def test_default_edge_jumps_over_a_step_without_compensation() -> None:
    g = build(["a", "x", "c"], {"x": ["a"], "c": ["x"]}, compensatable=["a", "c"])
    assert g.defaults == {("c", "a")}
    assert g.precedence == {("c", "a")}
    assert g.predecessors("x") == frozenset()
    assert g.compensation_levels(["a", "c"]) == [["c"], ["a"]]


def test_chain_with_compensation_only_at_the_ends() -> None:
    g = build(["a", "b", "c"], {"b": ["a"], "c": ["b"]}, compensatable=["a", "c"])
    assert g.defaults == {("c", "a")}
    assert g.precedence == {("c", "a")}


def test_diamond() -> None:
    g = build(["a", "b", "c", "d"], {"b": ["a"], "c": ["a"], "d": ["b", "c"]})
    assert g.defaults == {("b", "a"), ("c", "a"), ("d", "b"), ("d", "c")}
    assert g.precedence == g.defaults | {("d", "a")}
    assert g.compensation_levels("abcd") == [["d"], ["b", "c"], ["a"]]
    assert g.ready("abcd", ["d"]) == ["b", "c"]  # independent compensations run together
    assert g.ready("abcd", ["d", "b"]) == ["c"]


def test_diamond_with_uncompensated_middle_has_one_default_edge() -> None:
    g = build(["a", "b", "c", "d"], {"b": ["a"], "c": ["a"], "d": ["b", "c"]}, ["a", "d"])
    assert g.defaults == {("d", "a")}
    assert g.precedence == {("d", "a")}


def test_independent_steps_compensate_together() -> None:
    g = build(["a", "b", "c"], {})
    assert g.precedence == frozenset()
    assert g.compensation_levels("cab") == [["a", "b", "c"]]  # declaration order


def test_explicit_order_overrides_through_its_closure() -> None:
    """a -> b -> c explicitly implies comp(a) before comp(c): the default c -> a is dropped."""
    g = build(
        ["a", "x", "c", "b"],
        {"x": ["a"], "c": ["x"]},
        compensatable=["a", "b", "c"],
        explicit={"b": ["a"], "c": ["b"]},
    )
    assert g.dropped == {("c", "a")}
    assert g.defaults == frozenset()
    assert g.precedence == {("a", "b"), ("b", "c"), ("a", "c")}


def test_explicit_edge_between_unrelated_steps_adds_to_the_default() -> None:
    g = build(["a", "b", "z"], {"b": ["a"]}, explicit={"z": ["b"]})
    assert g.defaults == {("b", "a")}
    assert g.dropped == frozenset()
    assert g.precedence == {("b", "a"), ("b", "z")}
    assert g.compensation_levels("abz") == [["b"], ["a", "z"]]


def test_explicit_edge_that_overrides_only_one_default() -> None:
    g = build(["a", "b", "c"], {"b": ["a"], "c": ["b"]}, explicit={"b": ["a"]})
    assert g.dropped == {("b", "a")}
    assert g.defaults == {("c", "b")}
    assert g.precedence == {("a", "b"), ("c", "b")}
    assert g.compensation_levels("abc") == [["a", "c"], ["b"]]


def test_compensation_levels_accepts_any_iterable() -> None:
    """The signature says ``Iterable[str]``: a generator must give the same waves as a list."""
    g = build(["a", "b", "c"], {"b": ["a"], "c": ["b"]})
    assert g.compensation_levels(s for s in "abc") == [["c"], ["b"], ["a"]]


def test_ready_accepts_any_iterable() -> None:
    g = build(["a", "b", "c"], {"b": ["a"], "c": ["b"]})
    assert g.ready((s for s in "abc"), (s for s in "c")) == ["b"]


def test_ready_ignores_finished_and_unaffected_steps() -> None:
    g = build(["a", "b", "c"], {"b": ["a"], "c": ["b"]})
    assert g.ready(["a"], ["b", "c"]) == ["a"]
    assert g.ready(["a", "b"], ["a", "b"]) == []


# --------------------------------------------------------------------------- refused


def test_mixed_cycle_is_refused_naming_its_steps() -> None:
    """Chain a -> b -> c (all in K) gives c -> b -> a; "comp(a) before comp(c)" closes a cycle."""
    err = refused(["a", "b", "c"], {"b": ["a"], "c": ["b"]}, explicit={"c": ["a"]})
    assert set(err.steps) == {"a", "b", "c"}
    assert is_cycle_in(err.steps, {("a", "c"), ("c", "b"), ("b", "a")})
    assert all(s in str(err) for s in "abc")
    assert "depends_on" in str(err)  # tells the user how to decide it


def test_cycle_in_explicit_order_is_refused_naming_it() -> None:
    err = refused(["a", "b", "c"], {}, explicit={"a": ["b"], "b": ["c"], "c": ["a"]})
    assert is_cycle_in(err.steps, {("b", "a"), ("c", "b"), ("a", "c")})
    assert set(err.steps) == {"a", "b", "c"}


def test_two_cycle_in_explicit_order_is_refused() -> None:
    err = refused(["a", "b"], {"b": ["a"]}, explicit={"a": ["b"], "b": ["a"]})
    assert set(err.steps) == {"a", "b"}


def test_explicit_self_edge_is_refused() -> None:
    assert refused(["a"], {}, explicit={"a": ["a"]}).steps == ("a",)


def test_explicit_dependency_without_compensation_is_refused() -> None:
    err = refused(["a", "b"], {}, compensatable=["b"], explicit={"b": ["a"]})
    assert set(err.steps) == {"a", "b"}
    assert "a" in str(err)


def test_explicit_dependency_on_unknown_step_is_refused() -> None:
    err = refused(["a", "b"], {}, explicit={"b": ["ghost"]})
    assert "ghost" in err.steps
    assert "ghost" in str(err)


def test_explicit_order_for_step_without_compensation_is_refused() -> None:
    err = refused(["a", "b"], {}, compensatable=["a"], explicit={"b": ["a"]})
    assert "b" in err.steps


def test_compensation_for_unknown_step_is_refused() -> None:
    err = refused(["a"], {}, compensatable=["a", "ghost"])
    assert err.steps == ("ghost",)


def test_forward_cycle_is_refused_naming_it() -> None:
    err = refused(["a", "b", "c"], {"a": ["c"], "b": ["a"], "c": ["b"]})
    assert is_cycle_in(err.steps, {("c", "a"), ("a", "b"), ("b", "c")})
    assert all(s in str(err) for s in "abc")


def test_forward_self_dependency_is_refused() -> None:
    err = refused(["a", "b"], {"b": ["b"]})
    assert err.steps == ("b",)


def test_unknown_forward_dependency_is_refused_naming_both() -> None:
    err = refused(["a", "b", "c"], {"b": ["ghost"], "c": ["a", "phantom"]})
    assert set(err.steps) == {"b", "c"}
    assert "ghost" in str(err)
    assert "phantom" in str(err)


def test_duplicate_step_names_are_refused_naming_them() -> None:
    err = refused(["a", "b", "a", "c", "c"], {})
    assert err.steps == ("a", "c")
    with pytest.raises(SagaDefinitionError):
        validate_forward(["x", "x"], {})


# --------------------------------------------------------------------------- helpers


def test_find_cycle_examples() -> None:
    assert find_cycle(["a", "b"], {"a": ["b"]}) is None
    assert find_cycle([], {}) is None
    assert find_cycle(["a"], {"a": ["a"]}) == ["a", "a"]
    cycle = find_cycle(["a", "b", "c", "d"], {"a": ["b"], "b": ["c"], "c": ["b"], "d": ["a"]})
    assert cycle == ["b", "c", "b"]


def test_closure_examples() -> None:
    assert closure(["a", "b", "c"], [("a", "b"), ("b", "c")]) == {
        ("a", "b"),
        ("b", "c"),
        ("a", "c"),
    }
    assert closure(["a", "b"], [("a", "b"), ("b", "a")]) == {
        ("a", "b"),
        ("b", "a"),
        ("a", "a"),
        ("b", "b"),
    }


def test_default_edges_examples() -> None:
    deps = {"b": ["a"], "c": ["b"], "d": ["c"]}
    assert default_edges("abcd", deps, "abcd") == {("b", "a"), ("c", "b"), ("d", "c")}
    assert default_edges("abcd", deps, "ad") == {("d", "a")}
    assert default_edges("abcd", deps, "") == frozenset()
    assert default_edges("abcd", deps, "ac") == {("c", "a")}


def test_topological_order_breaks_ties_by_declaration_not_by_name() -> None:
    assert topological_order(["zeta", "alpha", "mid"], {}) == ["zeta", "alpha", "mid"]
    # "late" is declared first but depends on "early": it moves after it, and only after it.
    assert topological_order(["late", "x", "early"], {"late": ["early"]}) == ["x", "early", "late"]
    assert topological_order(["c", "b", "a"], {"c": ["a"], "b": ["a"]}) == ["a", "c", "b"]


# --------------------------------------------------------------------------- fingerprint


ORDER_SAGA = (
    ["create_order", "charge_payment"],
    {"charge_payment": ["create_order"]},
    ["create_order", "charge_payment"],
    {"charge_payment": ["create_order"]},
)


def test_fingerprint_is_stable_and_short() -> None:
    one = build(*ORDER_SAGA).fingerprint()
    assert one == build(*ORDER_SAGA).fingerprint()
    assert len(one) >= 16
    assert all(ch in "0123456789abcdef" for ch in one)


def test_fingerprint_is_the_same_in_another_interpreter() -> None:
    """Hash randomisation must not leak in (iteration over sets): the version is persisted."""
    code = textwrap.dedent(
        f"""
        from saga_core.graph import SagaCompensationGraph
        steps, deps, k, explicit = {ORDER_SAGA!r}
        print(SagaCompensationGraph.build(steps, deps, k, explicit).fingerprint())
        diamond = SagaCompensationGraph.build(
            "abcdefg", {{"b": "a", "c": "a", "d": "bc", "e": "d", "f": "d"}}, "abcdefg", {{}}
        )
        print(diamond.fingerprint())
        """
    )
    here = [build(*ORDER_SAGA).fingerprint()]
    here.append(
        SagaCompensationGraph.build(
            "abcdefg", {"b": "a", "c": "a", "d": "bc", "e": "d", "f": "d"}, "abcdefg", {}
        ).fingerprint()
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        assert out.stdout.split() == here


def test_fingerprint_differs_when_precedence_differs() -> None:
    overridden = build(*ORDER_SAGA)
    default = build(ORDER_SAGA[0], ORDER_SAGA[1])
    assert overridden.precedence != default.precedence
    assert overridden.fingerprint() != default.fingerprint()


def test_fingerprint_differs_when_forward_graph_differs() -> None:
    chain = build(["a", "b", "c"], {"b": ["a"], "c": ["b"]}, compensatable=["a"])
    fan = build(["a", "b", "c"], {"b": ["a"], "c": ["a"]}, compensatable=["a"])
    assert chain.precedence == fan.precedence == frozenset()
    assert chain.fingerprint() != fan.fingerprint()
    fewer = build(["a", "b"], {"b": ["a"]}, compensatable=["a"])
    assert fewer.fingerprint() != chain.fingerprint()
    reordered = build(["b", "a", "c"], {"b": ["a"], "c": ["b"]}, compensatable=["a"])
    assert reordered.fingerprint() != chain.fingerprint()  # declaration order breaks ties


def test_fingerprint_differs_when_k_differs() -> None:
    assert build(["a"], {}, []).fingerprint() != build(["a"], {}, ["a"]).fingerprint()


@pytest.mark.parametrize(
    ("one", "other"),
    [
        # Two steps "a", "b" versus one step named "a:;s:b".
        ((["a", "b"], {}, []), (["a:;s:b"], {}, [])),
        # "b" depends on "a,c"... versus on "a" and "c".
        (
            (["a", "c", "a,c", "b"], {"b": ["a,c"]}, []),
            (["a", "c", "a,c", "b"], {"b": ["a", "c"]}, []),
        ),
    ],
)
def test_fingerprint_differs_for_step_names_with_separator_characters(
    one: tuple[list[str], dict[str, list[str]], list[str]],
    other: tuple[list[str], dict[str, list[str]], list[str]],
) -> None:
    """Step names are free text (``@step(name=...)``): the encoding must be unambiguous, or two
    different definitions share a version and a worker advances a saga it does not know."""
    assert build(*one, {}).fingerprint() != build(*other, {}).fingerprint()
