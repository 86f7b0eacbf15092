"""Property tests of ``saga_core.graph`` against the brute-force reference model in strategies.

On random forward DAGs (1-9 steps, declaration order shuffled against the dependency order), random
``K`` and random explicit compensation edges (including cycles in ``E`` and mixed cycles):

1. ``SagaCompensationGraph.build`` accepts exactly the definitions without a cycle in ``E`` or in
   ``E ∪ D'``; an accepted one has ``explicit == E``, ``defaults == D'``, ``dropped == D - D'``
   (``D`` by enumerating every forward path, ``closure(E)`` by Floyd-Warshall) and
   ``precedence == closure(E ∪ D')``, which is acyclic, transitively closed and contains ``E``
   and ``D'``.
2. A refused one really has such a cycle and the error's ``.steps`` is a real cycle of ``E``
   (explicit cycle) or of ``E ∪ D'`` using both kinds of edge (mixed cycle), named in the
   message. Explicit edges to a step outside ``K``, to an unknown step, from a step outside
   ``K`` and self-edges are refused naming the steps.
3. ``topological_order`` keeps every dependency first and equals the order that is smallest by
   declaration index (brute force over permutations); on cyclic graphs it refuses naming a real
   cycle.
4. Simulating compensation with ``ready`` (any subset of the ready steps finishing in a round)
   compensates every affected step exactly once, only after its affected predecessors in ``P``,
   never an unaffected step, and never deadlocks; ``compensation_levels`` equals the waves of the
   longest-chain depth.
5. ``fingerprint`` is stable for the same definition (however its mappings are built) and
   differs when the forward graph, ``K`` or ``P`` differ.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from saga_core.errors import SagaDefinitionError
from saga_core.graph import SagaCompensationGraph, closure, find_cycle, topological_order
from tests.core.strategies import (
    SagaSpec,
    affected_subsets,
    brute_topological_order,
    expected_compensation,
    expected_levels,
    forward_dags,
    forward_digraphs,
    has_cycle,
    is_cycle_in,
    reach,
    saga_specs,
    valid_saga_specs,
)

HEAVY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much]
)


def build(spec: SagaSpec) -> SagaCompensationGraph:
    return SagaCompensationGraph.build(
        spec.steps, spec.depends_on, spec.compensatable, spec.explicit
    )


def check_against_model(spec: SagaSpec) -> None:
    expected = expected_compensation(spec)
    if expected.accepted:
        event("accepted")
        graph = build(spec)
        p = graph.precedence
        assert graph.compensatable == spec.compensatable
        assert graph.explicit == expected.explicit
        assert graph.defaults == expected.defaults
        assert graph.dropped == expected.dropped
        assert graph.defaults | graph.dropped == expected.default_all
        assert p == expected.precedence
        # The properties of P stated directly, not only as equality with the model.
        assert not any(u == v for u, v in p), "P has a cycle"
        assert expected.explicit <= p
        assert expected.defaults <= p
        assert all((a, c) in p for a, b in p for b2, c in p if b == b2), "P not closed"
        # A dropped default edge b -> a is overridden by an explicit order a -> ... -> b.
        assert all((a, b) in p for b, a in graph.dropped)
        for s in spec.steps:
            assert graph.predecessors(s) == {t for t, u in p if u == s}
        return
    event("refused: explicit cycle" if expected.explicit_cycle else "refused: mixed cycle")
    with pytest.raises(SagaDefinitionError) as info:
        build(spec)
    cycle = info.value.steps
    assert all(s in str(info.value) for s in cycle)
    if expected.explicit_cycle:
        assert is_cycle_in(cycle, expected.explicit), cycle
    else:
        assert is_cycle_in(cycle, expected.union), cycle
        edges = set(itertools.pairwise(cycle))
        assert edges & expected.explicit, "a mixed cycle uses an explicit edge"
        assert edges & expected.defaults, "a mixed cycle uses a default edge"


@HEAVY
@given(saga_specs(explicit="any"))
def test_build_matches_model_with_arbitrary_explicit_edges(spec: SagaSpec) -> None:
    check_against_model(spec)


@HEAVY
@given(saga_specs(explicit="any", focus="across a step of K"))
def test_build_matches_model_with_edges_across_steps_of_k(spec: SagaSpec) -> None:
    check_against_model(spec)


@HEAVY
@given(saga_specs(explicit="acyclic"))
def test_build_matches_model_with_acyclic_explicit_edges(spec: SagaSpec) -> None:
    check_against_model(spec)


@HEAVY
@given(saga_specs(explicit="none", shuffle=False))
def test_without_explicit_edges_every_definition_is_accepted(spec: SagaSpec) -> None:
    expected = expected_compensation(spec)
    assert expected.accepted  # D reverses forward reachability, so it is acyclic
    graph = build(spec)
    assert graph.dropped == frozenset()
    assert graph.precedence == expected.precedence


@HEAVY
@given(
    saga_specs(explicit="none"),
    st.sampled_from(["self", "unknown dep", "dep outside K", "step outside K", "unknown step"]),
    st.data(),
)
def test_explicit_edges_must_join_two_distinct_steps_of_k(
    spec: SagaSpec, kind: str, data: st.DataObject
) -> None:
    k = [s for s in spec.steps if s in spec.compensatable]
    outside = [s for s in spec.steps if s not in spec.compensatable]
    assume(k)
    assume(outside or kind not in ("dep outside K", "step outside K"))
    event(kind)
    explicit: dict[str, tuple[str, ...]]
    if kind == "self":
        s = data.draw(st.sampled_from(k))
        explicit, named = {s: (s,)}, {s}
    elif kind == "unknown dep":
        s = data.draw(st.sampled_from(k))
        explicit, named = {s: ("no_such_step",)}, {s, "no_such_step"}
    elif kind == "dep outside K":
        s, d = data.draw(st.sampled_from(k)), data.draw(st.sampled_from(outside))
        explicit, named = {s: (d,)}, {s, d}
    elif kind == "step outside K":
        s = data.draw(st.sampled_from(outside))
        explicit, named = {s: tuple(k[:1])}, {s}
    else:
        explicit, named = {"no_such_step": tuple(k[:1])}, {"no_such_step"}
    with pytest.raises(SagaDefinitionError) as info:
        SagaCompensationGraph.build(spec.steps, spec.depends_on, spec.compensatable, explicit)
    assert named <= set(info.value.steps)
    assert all(n in str(info.value) for n in named)


@HEAVY
@given(forward_dags(max_steps=7))
def test_topological_order_is_smallest_by_declaration_index(
    graph: tuple[tuple[str, ...], dict[str, tuple[str, ...]]],
) -> None:
    steps, depends_on = graph
    order = topological_order(steps, depends_on)
    assert sorted(order) == sorted(steps)
    position = {s: i for i, s in enumerate(order)}
    assert all(position[d] < position[s] for s in steps for d in depends_on[s])
    assert order == brute_topological_order(steps, depends_on)
    # Deterministic: the mapping's insertion order and the order inside depends_on lists do not
    # matter, only the declaration order does.
    shuffled = {s: tuple(reversed(depends_on[s])) for s in reversed(steps)}
    assert topological_order(steps, shuffled) == order


@HEAVY
@given(forward_digraphs(max_steps=7))
def test_topological_order_refuses_exactly_the_cyclic_graphs(
    graph: tuple[tuple[str, ...], dict[str, tuple[str, ...]]],
) -> None:
    steps, depends_on = graph
    edges = {(d, s) for s in steps for d in depends_on[s]}
    if not has_cycle(steps, edges):
        event("acyclic")
        assert topological_order(steps, depends_on) == brute_topological_order(steps, depends_on)
        return
    event("cyclic")
    with pytest.raises(SagaDefinitionError) as info:
        topological_order(steps, depends_on)
    assert is_cycle_in(info.value.steps, edges)
    assert all(s in str(info.value) for s in info.value.steps)


@HEAVY
@given(forward_digraphs(max_steps=7))
def test_find_cycle_and_closure_match_floyd_warshall(
    graph: tuple[tuple[str, ...], dict[str, tuple[str, ...]]],
) -> None:
    steps, depends_on = graph
    edges = {(d, s) for s in steps for d in depends_on[s]}
    succ = {s: [t for u, t in edges if u == s] for s in steps}
    assert closure(steps, edges) == reach(steps, edges)
    cycle = find_cycle(steps, succ)
    if has_cycle(steps, edges):
        assert cycle is not None
        assert is_cycle_in(cycle, edges)
        assert len(set(cycle)) == len(cycle) - 1, "a simple cycle"
    else:
        assert cycle is None


@HEAVY
@given(
    valid_saga_specs().flatmap(lambda spec: st.tuples(st.just(spec), affected_subsets(spec))),
    st.data(),
)
def test_simulated_compensation_respects_precedence_and_terminates(
    case: tuple[SagaSpec, frozenset[str]], data: st.DataObject
) -> None:
    spec, affected = case
    graph = build(spec)
    p = expected_compensation(spec).precedence
    # Unaffected steps count as compensated (skipped); some callers pass them as finished.
    skipped = [s for s in spec.steps if s not in affected]
    finished: set[str] = set(
        data.draw(st.lists(st.sampled_from(skipped), unique=True)) if skipped else []
    )
    compensated: list[str] = []
    for _ in range(len(affected) + 1):
        ready = graph.ready(affected, finished)
        if not ready:
            break
        assert ready == [s for s in spec.steps if s in ready], "declaration order"
        for s in ready:
            assert s in affected
            assert s not in finished
            assert all(t in finished for t, u in p if u == s and t in affected)
        # Concurrency: any non-empty subset of the ready compensations may finish first.
        done = data.draw(st.lists(st.sampled_from(ready), unique=True, min_size=1))
        compensated.extend(done)
        finished.update(done)
    assert graph.ready(affected, finished) == []
    assert sorted(compensated) == sorted(affected), "each affected step exactly once, no deadlock"
    position = {s: i for i, s in enumerate(compensated)}
    assert all(position[t] < position[s] for t, s in p if t in affected and s in affected)


@HEAVY
@given(valid_saga_specs().flatmap(lambda spec: st.tuples(st.just(spec), affected_subsets(spec))))
def test_compensation_levels_are_longest_chain_waves(case: tuple[SagaSpec, frozenset[str]]) -> None:
    spec, affected = case
    graph = build(spec)
    levels = graph.compensation_levels(affected)
    assert levels == expected_levels(spec.steps, affected, expected_compensation(spec).precedence)
    assert graph.compensation_levels(sorted(affected)) == levels
    assert graph.compensation_levels(list(affected)) == levels


@HEAVY
@given(saga_specs(explicit="acyclic").filter(lambda s: expected_compensation(s).accepted))
def test_fingerprint_is_stable_for_the_same_definition(spec: SagaSpec) -> None:
    first = build(spec)
    again = SagaCompensationGraph.build(
        list(spec.steps),
        {s: list(spec.depends_on[s]) for s in reversed(spec.steps)},
        sorted(spec.compensatable, reverse=True),
        {s: list(spec.explicit[s]) for s in reversed(list(spec.explicit))},
    )
    assert again.fingerprint() == first.fingerprint()
    assert first.fingerprint() == build(spec).fingerprint()


@HEAVY
@given(saga_specs(explicit="none").filter(lambda s: any(len(d) > 1 for d in s.depends_on.values())))
def test_fingerprint_ignores_the_order_inside_depends_on(spec: SagaSpec) -> None:
    """``depends_on=["a", "b"]`` and ``["b", "a"]`` declare the same graph: same version,
    otherwise a cosmetic edit orphans every stored saga of that type."""
    reordered = {s: tuple(reversed(d)) for s, d in spec.depends_on.items()}
    other = SagaCompensationGraph.build(spec.steps, reordered, spec.compensatable, spec.explicit)
    assert other.fingerprint() == build(spec).fingerprint()


@HEAVY
@given(st.data())
def test_fingerprint_differs_when_graph_k_or_precedence_differ(data: st.DataObject) -> None:
    one = data.draw(valid_saga_specs(max_steps=5), label="one")
    # A second definition over the same declared steps (sometimes the very same one).
    two = data.draw(valid_saga_specs(names=one.steps) | st.just(one), label="two")
    g1, g2 = build(one), build(two)
    same = (
        one.forward_edges == two.forward_edges
        and one.compensatable == two.compensatable
        and g1.precedence == g2.precedence
    )
    event("same definition" if same else "different definitions")
    assert (g1.fingerprint() == g2.fingerprint()) == same
