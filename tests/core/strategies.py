"""Hypothesis strategies for saga definitions, and a brute-force reference model of DESIGN.md §2.

The strategies produce :class:`SagaSpec`, a plain data object (step names in declaration order,
forward ``depends_on``, the set ``K`` of steps with a compensation and the explicit compensation
dependencies ``explicit[s] = (d, ...)`` from ``@compensate(s, depends_on=[d, ...])``). It is
meant to be reused by run-time property tests of the orchestrator: :func:`build_saga_class`
turns a spec into a ``DeclarativeSaga`` subclass.

The reference model (``reach``, ``brute_default_edges``, ``expected_compensation``,
``expected_levels``, ``brute_topological_order``) recomputes everything the graph module
computes, from the definitions in the design and with deliberately different algorithms
(Floyd-Warshall instead of DFS, enumeration of every forward path instead of a pruned search,
enumeration of permutations instead of Kahn's algorithm). Tests compare the implementation
against it; nothing here imports ``saga_core.graph``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hypothesis import strategies as st

from saga_core.definition import DeclarativeSaga, compensate, step

Edge = tuple[str, str]

#: Step names: their alphabetical order is unrelated to any declaration order we draw, so a
#: tie-break "by name" instead of "by declaration" shows up.
NAME_POOL: tuple[str, ...] = (
    "reserve",
    "charge",
    "ship",
    "notify",
    "audit",
    "bill",
    "emit",
    "hold",
    "pack",
    "zap",
    "log",
    "create",
)

ExplicitMode = Literal["any", "acyclic", "none"]
Focus = Literal["any", "along forward paths", "across a step of K"]


@dataclass(frozen=True)
class SagaSpec:
    """A saga definition as plain data.

    Attributes:
        steps: step names in declaration order.
        depends_on: forward dependencies; every step has an entry (possibly empty), listed in
            declaration order of the dependencies.
        compensatable: ``K``, the steps that have a ``@compensate``.
        explicit: ``explicit[s] = (d, ...)`` for ``@compensate(s, depends_on=[d, ...])``; only
            steps with a non-empty list have an entry.
    """

    steps: tuple[str, ...]
    depends_on: Mapping[str, tuple[str, ...]]
    compensatable: frozenset[str]
    explicit: Mapping[str, tuple[str, ...]]

    @property
    def forward_edges(self) -> frozenset[Edge]:
        """``(d, s)`` for every ``s`` that depends on ``d``."""
        return frozenset((d, s) for s in self.steps for d in self.depends_on.get(s, ()))

    @property
    def explicit_edges(self) -> frozenset[Edge]:
        """``E``: ``(d, s)`` for every ``d`` in ``explicit[s]`` (comp(d) before comp(s))."""
        return frozenset((d, s) for s, deps in self.explicit.items() for d in deps)


# --------------------------------------------------------------------------- strategies


@st.composite
def _subset(
    draw: st.DrawFn,
    items: Sequence[tuple[str, str]] | Sequence[tuple[int, int]],
    densities: Sequence[int] = (2, 1, 3, 4, 0),
) -> list[Any]:
    """A random subset with a random density.

    Hypothesis favours zeros (first choices), so a plain list or per-item booleans are mostly
    empty: here the favoured density is the first of ``densities`` (out of 4) and a zero draw
    keeps the item.
    """
    density = draw(st.sampled_from(densities))
    return [item for item in items if draw(st.integers(0, 3)) < density]


@st.composite
def forward_dags(
    draw: st.DrawFn,
    min_steps: int = 1,
    max_steps: int = 9,
    shuffle: bool = True,
    names: Sequence[str] | None = None,
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """A random forward DAG: ``(steps in declaration order, depends_on)``.

    Edges go from earlier to later steps of a hidden topological order; with ``shuffle`` that
    order is a random permutation of the declaration order (so a step may depend on one declared
    after it), without it the two coincide. ``names`` fixes the declared steps.
    """
    if names is None:
        n = draw(st.integers(min_steps, max_steps))
        names = tuple(draw(st.permutations(NAME_POOL))[:n])
    else:
        names, n = tuple(names), len(names)
    hidden = list(draw(st.permutations(range(n)))) if shuffle else list(range(n))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    deps: dict[str, set[int]] = {s: set() for s in names}
    for i, j in draw(_subset(pairs)):
        deps[names[hidden[j]]].add(hidden[i])
    return names, {s: tuple(names[i] for i in sorted(deps[s])) for s in names}


@st.composite
def forward_digraphs(
    draw: st.DrawFn, min_steps: int = 1, max_steps: int = 7
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """A random forward graph that may have cycles (never self-loops)."""
    n = draw(st.integers(min_steps, max_steps))
    names = tuple(draw(st.permutations(NAME_POOL))[:n])
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    deps: dict[str, set[int]] = {s: set() for s in names}
    for i, j in draw(_subset(pairs)):
        deps[names[j]].add(i)
    return names, {s: tuple(names[i] for i in sorted(deps[s])) for s in names}


@st.composite
def saga_specs(
    draw: st.DrawFn,
    min_steps: int = 1,
    max_steps: int = 9,
    shuffle: bool = True,
    explicit: ExplicitMode = "any",
    names: Sequence[str] | None = None,
    focus: Focus | None = None,
) -> SagaSpec:
    """A random saga: forward DAG, random ``K`` and random explicit compensation edges.

    ``explicit``:
      * ``"any"``: arbitrary edges between distinct steps of ``K`` (cycles in ``E`` and mixed
        cycles with the default order both happen);
      * ``"acyclic"``: edges only forward in a random order of ``K`` (``E`` is acyclic, mixed
        cycles still happen);
      * ``"none"``: no explicit edges (always a valid definition).

    Explicit edges always reference two distinct steps of ``K``; invalid references are tested
    separately. ``names`` fixes the declared steps. ``focus`` (random by default) restricts
    ``"any"`` explicit edges to pairs ``(a, b)`` with a forward path a -> ... -> b, or with such a
    path through a step of ``K`` (which makes mixed cycles likely).
    """
    steps, depends_on = draw(forward_dags(min_steps, max_steps, shuffle, names))
    # Hypothesis favours False: "not in K" keeps most examples with a sizeable K.
    not_k = draw(st.lists(st.booleans(), min_size=len(steps), max_size=len(steps)))
    k = [s for s, flag in zip(steps, not_k, strict=True) if not flag]
    forward = reach(steps, ((d, s) for s in steps for d in depends_on[s]))
    # Explicit edges that agree with the forward direction (comp(a) before comp(b) for a forward
    # ancestor a of b) are the interesting ones: they override a default edge, or, when a step of
    # K lies between a and b, they contradict a chain of default edges and make a mixed cycle.
    # Uniform edges would rarely do either.
    if focus is None:
        focus = draw(st.sampled_from(["any", "along forward paths", "across a step of K"]))
    aligned = focus != "any"
    pairs: list[tuple[str, str]] = []
    if explicit == "any":
        pairs = [(d, s) for d in k for s in k if d != s]
        if focus == "along forward paths":
            pairs = [(d, s) for d, s in pairs if (d, s) in forward]
        elif focus == "across a step of K":
            pairs = [
                (d, s) for d, s in pairs if any((d, m) in forward and (m, s) in forward for m in k)
            ]
    elif explicit == "acyclic":
        if aligned:
            topo = {s: sum((t, s) in forward for t in steps) for s in k}
            perm = sorted(k, key=lambda s: topo[s])
        else:
            perm = list(draw(st.permutations(k)))
        pairs = [(perm[i], perm[j]) for i in range(len(perm)) for j in range(i + 1, len(perm))]
    chosen = draw(_subset(pairs, densities=(1, 0, 2, 3)))
    exp: dict[str, list[str]] = {}
    for d, s in chosen:
        if d not in exp.setdefault(s, []):
            exp[s].append(d)
    return SagaSpec(
        steps=steps,
        depends_on=depends_on,
        compensatable=frozenset(k),
        explicit={s: tuple(ds) for s, ds in exp.items()},
    )


#: The name the lead's brief asked for.
random_saga_spec = saga_specs


def valid_saga_specs(
    min_steps: int = 1,
    max_steps: int = 9,
    shuffle: bool = True,
    explicit: ExplicitMode = "any",
    names: Sequence[str] | None = None,
) -> st.SearchStrategy[SagaSpec]:
    """Only specs the reference model accepts (no cycle in ``E`` nor in ``E ∪ D'``)."""
    return saga_specs(min_steps, max_steps, shuffle, explicit, names).filter(
        lambda spec: expected_compensation(spec).accepted
    )


@st.composite
def affected_subsets(draw: st.DrawFn, spec: SagaSpec) -> frozenset[str]:
    """A random subset of ``K``: the steps whose outcome is succeeded or unknown."""
    k = [s for s in spec.steps if s in spec.compensatable]
    return frozenset(draw(st.lists(st.sampled_from(k), unique=True)) if k else [])


# --------------------------------------------------------------------------- reference model


def reach(nodes: Sequence[str], edges: Iterable[Edge]) -> frozenset[Edge]:
    """Transitive closure by Floyd-Warshall: ``(u, v)`` when a path of >= 1 edge leads u -> v."""
    idx = {name: i for i, name in enumerate(nodes)}
    n = len(nodes)
    r = [[False] * n for _ in range(n)]
    for u, v in edges:
        r[idx[u]][idx[v]] = True
    for m in range(n):
        for i in range(n):
            if r[i][m]:
                for j in range(n):
                    if r[m][j]:
                        r[i][j] = True
    return frozenset((nodes[i], nodes[j]) for i in range(n) for j in range(n) if r[i][j])


def has_cycle(nodes: Sequence[str], edges: Iterable[Edge]) -> bool:
    """Whether some node reaches itself."""
    return any(u == v for u, v in reach(nodes, edges))


def is_cycle_in(cycle: Sequence[str], edges: Iterable[Edge]) -> bool:
    """Whether ``cycle`` is ``[n1, ..., n1]`` (>= 1 edge) and each consecutive pair is an edge."""
    edge_set = set(edges)
    return (
        len(cycle) >= 2
        and cycle[0] == cycle[-1]
        and all((u, v) in edge_set for u, v in itertools.pairwise(cycle))
    )


def forward_paths(
    steps: Sequence[str], depends_on: Mapping[str, Sequence[str]]
) -> Iterator[tuple[str, ...]]:
    """Every forward path of one or more edges (the graph must be acyclic)."""
    children: dict[str, list[str]] = {s: [] for s in steps}
    for s in steps:
        for d in depends_on.get(s, ()):
            children[d].append(s)

    def extend(path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        for c in children[path[-1]]:
            longer = (*path, c)
            yield longer
            yield from extend(longer)

    for s in steps:
        yield from extend((s,))


def brute_default_edges(spec: SagaSpec) -> frozenset[Edge]:
    """``D`` from its definition: ``b -> a`` for a, b in K joined by a forward path a -> ... -> b
    whose intermediate steps are all outside K."""
    k = spec.compensatable
    return frozenset(
        (path[-1], path[0])
        for path in forward_paths(spec.steps, spec.depends_on)
        if path[0] in k and path[-1] in k and not any(x in k for x in path[1:-1])
    )


@dataclass(frozen=True)
class ExpectedCompensation:
    """What section 2 says the compensation graph of a spec is."""

    explicit: frozenset[Edge]  # E
    default_all: frozenset[Edge]  # D
    defaults: frozenset[Edge]  # D'
    dropped: frozenset[Edge]  # D - D'
    explicit_cycle: bool  # a cycle in E: refused
    mixed_cycle: bool  # E acyclic, but E ∪ D' has a cycle: refused
    precedence: frozenset[Edge]  # closure(E ∪ D') (meaningless when refused)

    @property
    def accepted(self) -> bool:
        """Whether the definition is valid."""
        return not (self.explicit_cycle or self.mixed_cycle)

    @property
    def union(self) -> frozenset[Edge]:
        """``E ∪ D'``."""
        return self.explicit | self.defaults


def expected_compensation(spec: SagaSpec) -> ExpectedCompensation:
    """The reference computation of ``E``, ``D``, ``D'``, ``P`` and whether the spec is refused."""
    e = spec.explicit_edges
    d = brute_default_edges(spec)
    e_reach = reach(spec.steps, e)
    kept = frozenset((b, a) for b, a in d if (a, b) not in e_reach)
    explicit_cycle = any(u == v for u, v in e_reach)
    mixed_cycle = not explicit_cycle and has_cycle(spec.steps, e | kept)
    return ExpectedCompensation(
        explicit=e,
        default_all=d,
        defaults=kept,
        dropped=d - kept,
        explicit_cycle=explicit_cycle,
        mixed_cycle=mixed_cycle,
        precedence=reach(spec.steps, e | kept),
    )


def expected_levels(
    steps: Sequence[str], affected: Iterable[str], precedence: Iterable[Edge]
) -> list[list[str]]:
    """Waves of compensation: a step's wave is one more than the latest wave among its affected
    predecessors in ``P`` (0 without any); each wave in declaration order."""
    aff = set(affected)
    preds: dict[str, set[str]] = {s: set() for s in steps}
    for t, s in precedence:
        preds[s].add(t)
    level: dict[str, int] = {}

    def depth(s: str) -> int:
        if s not in level:
            level[s] = 1 + max((depth(t) for t in preds[s] & aff), default=-1)
        return level[s]

    for s in aff:
        depth(s)
    waves: list[list[str]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for s in steps:
        if s in aff:
            waves[level[s]].append(s)
    return waves


def brute_topological_order(
    steps: Sequence[str], depends_on: Mapping[str, Sequence[str]]
) -> list[str] | None:
    """The valid order that is smallest when compared as declaration indices, found by
    enumerating permutations in lexicographic order; ``None`` if there is none (a cycle)."""
    deps = [(steps.index(d), i) for i, s in enumerate(steps) for d in depends_on.get(s, ())]
    for perm in itertools.permutations(range(len(steps))):
        pos = {idx: p for p, idx in enumerate(perm)}
        if all(pos[d] < pos[s] for d, s in deps):
            return [steps[i] for i in perm]
    return None


# --------------------------------------------------------------------------- saga classes


def _default_action(name: str) -> Callable[..., Any]:
    def action(self: Any, ctx: Any) -> dict[str, Any]:
        return {name: "done"}

    return action


def _default_compensation(name: str) -> Callable[..., Any]:
    def undo(self: Any, ctx: Any) -> None:
        return None

    return undo


def build_saga_class(
    spec: SagaSpec,
    name: str = "GeneratedSaga",
    *,
    make_action: Callable[[str], Callable[..., Any]] = _default_action,
    make_compensation: Callable[[str], Callable[..., Any]] = _default_compensation,
    attrs: Mapping[str, Any] | None = None,
) -> type[DeclarativeSaga]:
    """A ``DeclarativeSaga`` subclass declaring ``spec``: methods ``do_<step>`` in declaration
    order, then ``undo_<step>`` for each step of ``K``.

    ``make_action(step)`` / ``make_compensation(step)`` return the (sync or async) functions
    to decorate. Raises ``SagaDefinitionError`` when the class is refused, like a class
    statement would.
    """
    namespace: dict[str, Any] = dict(attrs or {})
    for s in spec.steps:
        namespace[f"do_{s}"] = step(name=s, depends_on=list(spec.depends_on.get(s, ())))(
            make_action(s)
        )
    for s in spec.steps:
        if s in spec.compensatable:
            namespace[f"undo_{s}"] = compensate(s, depends_on=list(spec.explicit.get(s, ())))(
                make_compensation(s)
            )
    return type(name, (DeclarativeSaga,), namespace)
