"""The forward step graph and the compensation precedence (DESIGN.md section 2). Pure.

Notation (kept from the design so the code can be checked against it):

* ``K``  steps that have a compensation;
* ``E``  explicit edges ``d -> s`` from ``@compensate(s, depends_on=[d])``: comp(d) finishes before
  comp(s) starts;
* ``D``  default edges ``b -> a`` for ``a, b`` in ``K`` when the forward DAG has a path
  ``a -> ... -> b`` whose intermediate steps are all outside ``K`` (undo the later step first);
* ``D'`` the default edges whose reverse is not implied by ``E`` (an explicit order overrides);
* ``P``  the transitive closure of ``E ∪ D'``: comp(s) waits for every affected ``t`` with
  ``t -> s`` in ``P``.

Why the closure and not the edges: when a step in the middle of a chain is skipped (it was never
run), its neighbours must still be ordered, otherwise skipping would loosen the order.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from saga_core.errors import SagaDefinitionError

Edge = tuple[str, str]


def find_cycle(nodes: Sequence[str], successors: Mapping[str, Iterable[str]]) -> list[str] | None:
    """Return one cycle as ``[n1, n2, ..., n1]`` or ``None`` if the graph is acyclic.

    Iterative DFS so deep graphs do not hit the recursion limit; visits nodes in the given order
    so the reported cycle is deterministic.
    """
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(nodes, white)
    for root in nodes:
        if colour[root] != white:
            continue
        path: list[str] = [root]
        iters = [iter(sorted_like(successors.get(root, ()), nodes))]
        colour[root] = grey
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                iters.pop()
                continue
            if colour.get(nxt, white) == grey:
                return [*path[path.index(nxt) :], nxt]
            if colour.get(nxt, white) == white:
                colour[nxt] = grey
                path.append(nxt)
                iters.append(iter(sorted_like(successors.get(nxt, ()), nodes)))
    return None


def sorted_like(items: Iterable[str], order: Sequence[str]) -> list[str]:
    """``items`` sorted by their position in ``order`` (declaration order)."""
    pos = {name: i for i, name in enumerate(order)}
    return sorted(items, key=lambda n: pos.get(n, len(pos)))


def closure(nodes: Sequence[str], edges: Iterable[Edge]) -> frozenset[Edge]:
    """Transitive closure of ``edges`` over ``nodes`` (pairs ``(u, v)`` with a path u -> v)."""
    succ: dict[str, set[str]] = {n: set() for n in nodes}
    for u, v in edges:
        succ[u].add(v)
    result: set[Edge] = set()
    for start in nodes:
        seen: set[str] = set()
        stack = list(succ[start])
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(succ[n])
        result.update((start, n) for n in seen)
    return frozenset(result)


def topological_order(steps: Sequence[str], depends_on: Mapping[str, Sequence[str]]) -> list[str]:
    """Steps in dependency order, ties broken by declaration order (deterministic).

    Raises ``SagaDefinitionError`` naming the steps of a cycle.
    """
    pos = {name: i for i, name in enumerate(steps)}
    indegree = {s: len(depends_on.get(s, ())) for s in steps}
    dependents: dict[str, list[str]] = {s: [] for s in steps}
    for s in steps:
        for d in depends_on.get(s, ()):
            dependents[d].append(s)
    heap = [(pos[s], s) for s in steps if indegree[s] == 0]
    heapq.heapify(heap)
    order: list[str] = []
    while heap:
        _, s = heapq.heappop(heap)
        order.append(s)
        for t in dependents[s]:
            indegree[t] -= 1
            if indegree[t] == 0:
                heapq.heappush(heap, (pos[t], t))
    if len(order) != len(steps):
        succ = {s: dependents[s] for s in steps}
        cycle = find_cycle(list(steps), succ) or [s for s in steps if s not in order]
        raise SagaDefinitionError(
            f"steps depend on each other in a cycle: {' -> '.join(cycle)}", cycle
        )
    return order


def validate_forward(steps: Sequence[str], depends_on: Mapping[str, Sequence[str]]) -> None:
    """Check names and dependencies of the forward graph; raise naming every offender."""
    dupes = sorted(name for name, n in Counter(steps).items() if n > 1)
    if dupes:
        raise SagaDefinitionError(f"duplicate step names: {', '.join(dupes)}", dupes)
    known = set(steps)
    unknown = [(s, d) for s in steps for d in depends_on.get(s, ()) if d not in known]
    if unknown:
        text = ", ".join(f"{s} depends on unknown step {d!r}" for s, d in unknown)
        raise SagaDefinitionError(text, sorted({s for s, _ in unknown}))
    self_deps = [s for s in steps if s in depends_on.get(s, ())]
    if self_deps:
        raise SagaDefinitionError(f"steps depend on themselves: {', '.join(self_deps)}", self_deps)
    topological_order(steps, depends_on)


def default_edges(
    steps: Sequence[str], depends_on: Mapping[str, Sequence[str]], compensatable: Iterable[str]
) -> frozenset[Edge]:
    """``D``: ``b -> a`` for a, b in K with a forward path a -> ... -> b through non-K steps."""
    k = set(compensatable)
    dependents: dict[str, list[str]] = {s: [] for s in steps}
    for s in steps:
        for d in depends_on.get(s, ()):
            dependents[d].append(s)
    edges: set[Edge] = set()
    for a in steps:
        if a not in k:
            continue
        seen: set[str] = set()
        stack = list(dependents[a])
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in k:
                edges.add((n, a))  # stop: a path through a K step is not "intermediates outside K"
            else:
                stack.extend(dependents[n])
    return frozenset(edges)


@dataclass(frozen=True)
class SagaCompensationGraph:
    """Compensation precedence of one saga definition, computed once (DESIGN.md section 2).

    Build it with :meth:`build`. It holds no run-time state: each saga instance keeps its own
    record of which compensations finished, so concurrent sagas never mix.
    """

    steps: tuple[str, ...]
    depends_on: Mapping[str, tuple[str, ...]]
    compensatable: frozenset[str]
    explicit: frozenset[Edge]
    defaults: frozenset[Edge]
    dropped: frozenset[Edge]
    precedence: frozenset[Edge]
    _before: Mapping[str, frozenset[str]] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def build(
        cls,
        steps: Sequence[str],
        depends_on: Mapping[str, Sequence[str]],
        compensatable: Iterable[str],
        explicit: Mapping[str, Sequence[str]],
    ) -> SagaCompensationGraph:
        """Compute ``P`` from the forward graph, the steps that have a compensation (``K``) and
        the explicit compensation dependencies (``explicit[s]`` lists the ``d`` in
        ``@compensate(s, depends_on=[d])``).

        Raises ``SagaDefinitionError`` naming the steps for every rule of section 2.
        """
        steps = tuple(steps)
        validate_forward(steps, depends_on)
        k = frozenset(compensatable)
        unknown_k = sorted(k - set(steps))
        if unknown_k:
            raise SagaDefinitionError(
                f"compensation for unknown step: {', '.join(unknown_k)}", unknown_k
            )
        e: set[Edge] = set()
        for s, deps in explicit.items():
            if s not in k:
                raise SagaDefinitionError(
                    f"compensation order given for {s!r}, which has no compensation", [s]
                )
            for d in deps:
                if d == s:
                    raise SagaDefinitionError(f"compensation of {s!r} cannot depend on itself", [s])
                if d not in k:
                    raise SagaDefinitionError(
                        f"compensation of {s!r} depends on {d!r}, which has no compensation"
                        if d in steps
                        else f"compensation of {s!r} depends on unknown step {d!r}",
                        [s, d],
                    )
                e.add((d, s))
        e_frozen = frozenset(e)
        cycle = find_cycle(steps, _successors(steps, e_frozen))
        if cycle:
            raise SagaDefinitionError(
                "explicit compensation order has a cycle: " + " -> ".join(cycle), cycle
            )
        e_closure = closure(steps, e_frozen)
        d_all = default_edges(steps, depends_on, k)
        # b -> a is dropped when the user explicitly ordered a before b (a -> b in closure(E)).
        d_kept = frozenset((b, a) for b, a in d_all if (a, b) not in e_closure)
        union = e_frozen | d_kept
        cycle = find_cycle(steps, _successors(steps, union))
        if cycle:
            raise SagaDefinitionError(
                "compensation order has a cycle mixing explicit and default (reverse forward) "
                f"order: {' -> '.join(cycle)}; add a depends_on to @compensate to decide it",
                cycle,
            )
        p = closure(steps, union)
        before: dict[str, set[str]] = {s: set() for s in steps}
        for t, s in p:
            before[s].add(t)
        return cls(
            steps=steps,
            depends_on={s: tuple(depends_on.get(s, ())) for s in steps},
            compensatable=k,
            explicit=e_frozen,
            defaults=d_kept,
            dropped=d_all - d_kept,
            precedence=p,
            _before={s: frozenset(v) for s, v in before.items()},
        )

    def predecessors(self, step: str) -> frozenset[str]:
        """Every ``t`` with ``t -> step`` in ``P``: compensations that must finish first."""
        return self._before.get(step, frozenset())

    def ready(self, affected: Iterable[str], finished: Iterable[str]) -> list[str]:
        """Affected compensations not finished whose affected predecessors all finished.

        Returned in declaration order. ``finished`` holds the compensations that are done
        (compensated or skipped).
        """
        aff = set(affected)
        done = set(finished)
        return [
            s
            for s in self.steps
            if s in aff and s not in done and not ((self.predecessors(s) & aff) - done)
        ]

    def compensation_levels(self, affected: Iterable[str]) -> list[list[str]]:
        """The affected compensations grouped in waves that may run concurrently (for display)."""
        wanted = set(affected)
        aff = [s for s in self.steps if s in wanted]
        done: set[str] = set()
        levels: list[list[str]] = []
        while len(done) < len(aff):
            level = self.ready(aff, done)
            levels.append(level)
            done.update(level)
        return levels

    def fingerprint(self) -> str:
        """A stable hash of the forward graph and the precedence (the definition version)."""
        # JSON, so no step name can fake a separator; dependencies sorted, since their order
        # inside depends_on means nothing and must not orphan stored sagas when edited.
        shape = {
            "steps": list(self.steps),
            "depends_on": {s: sorted(self.depends_on[s]) for s in self.steps},
            "compensatable": sorted(self.compensatable),
            "precedence": sorted([t, s] for t, s in self.precedence),
        }
        text = json.dumps(shape, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _successors(steps: Sequence[str], edges: Iterable[Edge]) -> dict[str, list[str]]:
    succ: dict[str, list[str]] = {s: [] for s in steps}
    for u, v in edges:
        succ[u].append(v)
    return succ
