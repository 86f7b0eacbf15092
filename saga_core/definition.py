"""Declaring sagas: ``@step``, ``@compensate``, ``DeclarativeSaga`` and their validation.

A saga class is checked when Python creates it, so a broken definition fails at import time with
a ``SagaDefinitionError`` that names the steps, never half-way through a run.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from saga_core._text import text_problem
from saga_core.errors import SagaDefinitionError
from saga_core.graph import SagaCompensationGraph, topological_order
from saga_core.retry import (
    DEFAULT_COMPENSATION_RETRY,
    DEFAULT_RETRIABLE_RETRY,
    RUN_ONCE,
    RetryPolicy,
)

if TYPE_CHECKING:
    from saga_core.orchestrator import SagaOrchestrator, SagaResult

StepKind = Literal["compensatable", "pivot", "retriable"]
_KINDS = ("compensatable", "pivot", "retriable")
F = TypeVar("F", bound=Callable[..., Any])

_STEP_MARK = "__saga_step__"
_COMP_MARK = "__saga_compensation__"


@dataclass(frozen=True)
class _StepSpec:
    name: str | None
    depends_on: tuple[str, ...]
    aggregate_type: str | None
    event_type: str | None
    topic: str | None
    retry: RetryPolicy | None
    timeout: float | None
    kind: StepKind
    compensate_on_failure: bool
    clean_failures: tuple[type[BaseException], ...]
    transactional: bool


@dataclass(frozen=True)
class _CompSpec:
    for_step: str
    depends_on: tuple[str, ...]
    retry: RetryPolicy | None
    timeout: float | None
    event_type: str | None


@dataclass(frozen=True)
class CompensationDefinition:
    """How one step is undone."""

    step: str
    attr: str
    depends_on: tuple[str, ...]
    retry: RetryPolicy
    timeout: float | None
    event_type: str
    is_async: bool


@dataclass(frozen=True)
class StepDefinition:
    """One step of a saga, as declared with ``@step``."""

    name: str
    attr: str
    depends_on: tuple[str, ...]
    aggregate_type: str | None
    event_type: str
    topic: str | None
    retry: RetryPolicy
    timeout: float | None
    kind: StepKind
    compensate_on_failure: bool
    clean_failures: tuple[type[BaseException], ...]
    transactional: bool
    is_async: bool
    compensation: CompensationDefinition | None = None

    def is_clean_failure(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the step cleanly did nothing (so it is not compensated)."""
        from saga_core.errors import StepRejected

        if isinstance(exc, StepRejected):
            return True
        if not self.compensate_on_failure:
            return True
        return bool(self.clean_failures) and isinstance(exc, self.clean_failures)


@dataclass(frozen=True)
class SagaDefinition:
    """A validated saga: its steps, forward order, compensation precedence and version hash."""

    saga_type: str
    steps: tuple[StepDefinition, ...]
    graph: SagaCompensationGraph
    order: tuple[str, ...]
    pivot: str | None
    version: str
    ancestors: Mapping[str, tuple[str, ...]] = field(repr=False)

    def step(self, name: str) -> StepDefinition:
        """The step called ``name`` (``KeyError`` if there is none)."""
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, StepDefinition]:
        # Looked up for every step a run starts or checks: computed once per definition.
        return {s.name: s for s in self.steps}

    @functools.cached_property
    def step_names(self) -> tuple[str, ...]:
        """Step names in declaration order."""
        return tuple(s.name for s in self.steps)

    @functools.cached_property
    def roots(self) -> tuple[str, ...]:
        """Steps without dependencies, in declaration order (a saga's first steps)."""
        return tuple(s.name for s in self.steps if not s.depends_on)

    @functools.cached_property
    def dependents(self) -> Mapping[str, tuple[str, ...]]:
        """For each step, the steps that depend on it directly, in forward order."""
        out: dict[str, list[str]] = {s.name: [] for s in self.steps}
        for name in self.order:
            for dep in self.step(name).depends_on:
                out[dep].append(name)
        return {name: tuple(names) for name, names in out.items()}

    @functools.cached_property
    def uses_threads(self) -> bool:
        """Whether a step or compensation is a sync function run in a worker thread (a
        transactional step runs in the storage's thread, as part of its write)."""
        return any(
            (not s.is_async and not s.transactional)
            or (s.compensation is not None and not s.compensation.is_async)
            for s in self.steps
        )


def _names(value: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    names = tuple(value)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise SagaDefinitionError(f"{what} must list step names (str), got {bad!r}")
    return names


def _check_timeout(timeout: float | None, what: str) -> None:
    if timeout is not None and not timeout > 0:
        raise SagaDefinitionError(f"{what}: timeout must be > 0 seconds, got {timeout!r}")


def _check_texts(what: str, **texts: object) -> None:
    """Refuse, at definition time, text the saga's rows and events could not hold (a step
    would otherwise run and then fail to be recorded)."""
    for field_name, value in texts.items():
        problem = text_problem(value)
        if problem is not None:
            raise SagaDefinitionError(f"{what}: {field_name} {problem}")


def step(
    name: str | None = None,
    *,
    depends_on: str | Iterable[str] | None = None,
    aggregate_type: str | None = None,
    event_type: str | None = None,
    topic: str | None = None,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    kind: StepKind = "compensatable",
    compensate_on_failure: bool = True,
    clean_failures: Iterable[type[BaseException]] = (),
    transactional: bool = False,
) -> Callable[[F], F]:
    """Mark a method of a ``DeclarativeSaga`` as a step.

    Args:
        name: the step's name (default: the method's name).
        depends_on: steps that must succeed before this one starts.
        aggregate_type: the default topic of the step's event.
        event_type: the event emitted on success (default ``"<name>_completed"``).
        topic: overrides the event's topic.
        retry: how failures are retried (default: run once; retriable steps: unbounded).
        timeout: seconds per attempt; a timed-out step has an unknown outcome.
        kind: ``"compensatable"`` (default), ``"pivot"`` (the point of no return) or
            ``"retriable"`` (after the pivot, retried until it succeeds, never compensated).
        compensate_on_failure: ``False`` declares every failure of this step clean (nothing
            happened), so its compensation does not run when it fails.
        clean_failures: exception types that mean "nothing happened", like ``StepRejected``.
        transactional: the step is a sync function whose SQL on ``ctx.connection`` commits in the
            same transaction that records the step (exactly-once local effects).
    """
    if kind not in _KINDS:
        raise SagaDefinitionError(f"step {name!r}: kind must be one of {_KINDS}, got {kind!r}")
    _check_texts(
        f"step {name!r}" if name else "@step",
        name=name,
        aggregate_type=aggregate_type,
        event_type=event_type,
        topic=topic,
    )
    _check_timeout(timeout, f"step {name!r}" if name else "@step")
    clean = tuple(clean_failures)
    if not all(isinstance(c, type) and issubclass(c, BaseException) for c in clean):
        raise SagaDefinitionError(f"step {name!r}: clean_failures must be exception types")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise SagaDefinitionError(f"step {name!r}: retry must be a RetryPolicy")
    spec = _StepSpec(
        name=name,
        depends_on=_names(depends_on, f"step {name!r} depends_on"),
        aggregate_type=aggregate_type,
        event_type=event_type,
        topic=topic,
        retry=retry,
        timeout=timeout,
        kind=kind,
        compensate_on_failure=compensate_on_failure,
        clean_failures=clean,
        transactional=transactional,
    )

    def mark(func: F) -> F:
        setattr(func, _STEP_MARK, spec)
        return func

    return mark


def compensate(
    for_step: str,
    *,
    depends_on: str | Iterable[str] | None = None,
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    event_type: str | None = None,
) -> Callable[[F], F]:
    """Mark a method as the compensation of ``for_step``.

    Args:
        for_step: the step it undoes.
        depends_on: steps whose compensations must finish before this one starts. An explicit
            order overrides the default (reverse forward) order between the same two steps.
        retry: default: retried with backoff, giving up within about 30 seconds.
        timeout: seconds per attempt.
        event_type: the event emitted once compensated (default ``"<step>_compensated"``).
    """
    _check_timeout(timeout, f"compensation of {for_step!r}")
    _check_texts(f"compensation of {for_step!r}", for_step=for_step, event_type=event_type)
    spec = _CompSpec(
        for_step=for_step,
        depends_on=_names(depends_on, f"compensation of {for_step!r} depends_on"),
        retry=retry,
        timeout=timeout,
        event_type=event_type,
    )

    def mark(func: F) -> F:
        setattr(func, _COMP_MARK, spec)
        return func

    return mark


def _collect(
    cls: type,
) -> tuple[list[tuple[str, _StepSpec, Any]], list[tuple[str, _CompSpec, Any]]]:
    """Marked methods, base classes first, in definition order; an override replaces."""
    members: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            members.pop(attr, None)  # re-insert so an override takes the subclass position
            members[attr] = value
    steps = []
    comps = []
    for attr, value in members.items():
        func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if hasattr(func, _STEP_MARK):
            steps.append((attr, getattr(func, _STEP_MARK), func))
        if hasattr(func, _COMP_MARK):
            comps.append((attr, getattr(func, _COMP_MARK), func))
    return steps, comps


def build_definition(cls: type) -> SagaDefinition:
    """Validate a saga class and compute its definition (called when the class is created)."""
    saga_type = vars(cls).get("saga_type", cls.__name__)
    if not isinstance(saga_type, str) or not saga_type:
        raise SagaDefinitionError(f"{cls.__name__}.saga_type must be a non-empty str")
    _check_texts(cls.__name__, saga_type=saga_type)
    raw_steps, raw_comps = _collect(cls)
    comps: dict[str, CompensationDefinition] = {}
    explicit: dict[str, tuple[str, ...]] = {}
    for attr, cspec, func in raw_comps:
        if cspec.for_step in comps:
            other = comps[cspec.for_step].attr
            raise SagaDefinitionError(
                f"step {cspec.for_step!r} has two compensations: {other} and {attr}",
                [cspec.for_step],
            )
        comps[cspec.for_step] = CompensationDefinition(
            step=cspec.for_step,
            attr=attr,
            depends_on=cspec.depends_on,
            retry=cspec.retry or DEFAULT_COMPENSATION_RETRY,
            timeout=cspec.timeout,
            event_type=cspec.event_type or f"{cspec.for_step}_compensated",
            is_async=inspect.iscoroutinefunction(func),
        )
        if cspec.depends_on:
            explicit[cspec.for_step] = cspec.depends_on
    steps: list[StepDefinition] = []
    for attr, spec, func in raw_steps:
        name = spec.name or attr
        is_async = inspect.iscoroutinefunction(func)
        if spec.transactional and is_async:
            raise SagaDefinitionError(
                f"step {name!r} is transactional, so it must be a sync def (it runs its SQL on "
                "ctx.connection in a worker thread)",
                [name],
            )
        if spec.kind != "compensatable" and name in comps:
            raise SagaDefinitionError(
                f"step {name!r} is {spec.kind} and cannot have a compensation ({comps[name].attr})",
                [name],
            )
        default_retry = DEFAULT_RETRIABLE_RETRY if spec.kind == "retriable" else RUN_ONCE
        steps.append(
            StepDefinition(
                name=name,
                attr=attr,
                depends_on=spec.depends_on,
                aggregate_type=spec.aggregate_type,
                event_type=spec.event_type or f"{name}_completed",
                topic=spec.topic,
                retry=spec.retry or default_retry,
                timeout=spec.timeout,
                kind=spec.kind,
                compensate_on_failure=spec.compensate_on_failure,
                clean_failures=spec.clean_failures,
                transactional=spec.transactional,
                is_async=is_async,
                compensation=comps.get(name),
            )
        )
    names = [s.name for s in steps]
    unknown = sorted(set(comps) - set(names))
    if unknown:
        raise SagaDefinitionError(
            f"{cls.__name__}: compensation for unknown step: {', '.join(unknown)}", unknown
        )
    deps = {s.name: s.depends_on for s in steps}
    graph = SagaCompensationGraph.build(names, deps, comps.keys(), explicit)
    order = tuple(topological_order(names, deps))
    ancestors = _ancestors(order, deps)
    pivot = _check_kinds(steps, ancestors)
    return SagaDefinition(
        saga_type=saga_type,
        steps=tuple(steps),
        graph=graph,
        order=order,
        pivot=pivot,
        version=graph.fingerprint(),
        ancestors=ancestors,
    )


def _ancestors(
    order: tuple[str, ...], deps: Mapping[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    """For each step, its transitive dependencies in topological order."""
    anc: dict[str, set[str]] = {}
    for s in order:
        acc: set[str] = set()
        for d in deps[s]:
            acc.add(d)
            acc |= anc[d]
        anc[s] = acc
    return {s: tuple(t for t in order if t in anc[s]) for s in order}


def _check_kinds(
    steps: list[StepDefinition], ancestors: Mapping[str, tuple[str, ...]]
) -> str | None:
    """Pivot and retriable placement (DESIGN.md section 2); returns the pivot's name."""
    pivots = [s.name for s in steps if s.kind == "pivot"]
    if len(pivots) > 1:
        raise SagaDefinitionError(
            f"a saga has at most one pivot step, got {', '.join(pivots)}", pivots
        )
    retriable = [s.name for s in steps if s.kind == "retriable"]
    backward = [s.name for s in steps if s.kind == "compensatable"]
    if pivots:
        pivot = pivots[0]
        before = set(ancestors[pivot])
        for s in backward:
            if s not in before:
                raise SagaDefinitionError(
                    f"step {s!r} is not before the pivot {pivot!r}: a step that is not retriable "
                    f"must be an ancestor of the pivot (add depends_on to {pivot!r}, or make "
                    f"{s!r} retriable)",
                    [s, pivot],
                )
        for r in retriable:
            if pivot not in ancestors[r]:
                raise SagaDefinitionError(
                    f"retriable step {r!r} must come after the pivot {pivot!r} "
                    f"(add {pivot!r} to its depends_on)",
                    [r, pivot],
                )
        return pivot
    for r in retriable:
        missing = [s for s in backward if s not in ancestors[r]]
        if missing:
            raise SagaDefinitionError(
                f"retriable step {r!r} must come after every compensatable step; it does not "
                f"depend on {', '.join(missing)}",
                [r, *missing],
            )
    return None


_REGISTRY: dict[str, type[DeclarativeSaga]] = {}


def registered_saga(saga_type: str) -> type[DeclarativeSaga]:
    """The saga class defined (imported) in this process for ``saga_type``.

    Every ``DeclarativeSaga`` subclass with steps registers itself when defined; a later class
    with the same ``saga_type`` replaces an earlier one. Raises ``LookupError`` naming the type
    when no such class was imported.
    """
    try:
        return _REGISTRY[saga_type]
    except KeyError:
        raise LookupError(
            f"no saga class with saga_type {saga_type!r} is defined in this process; "
            "import the module that defines it"
        ) from None


def registered_sagas() -> dict[str, type[DeclarativeSaga]]:
    """Every saga type defined in this process."""
    return dict(_REGISTRY)


class DeclarativeSaga:
    """Base class of sagas declared with ``@step`` and ``@compensate`` methods.

    Subclasses are validated when defined. ``saga_type`` is the stable name stored with each saga
    (defaults to the class name; set it so a class can be renamed without orphaning its sagas).
    ``fail_fast = True`` cancels in-flight sibling steps as soon as one fails, instead of
    letting them finish.
    """

    saga_type: str
    fail_fast: bool = False
    __saga_definition__: SagaDefinition | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "saga_type" not in vars(cls):
            cls.saga_type = cls.__name__
        cls.__saga_definition__ = build_definition(cls)
        if cls.__saga_definition__.steps:
            _REGISTRY[cls.saga_type] = cls

    @classmethod
    def definition(cls) -> SagaDefinition:
        """The validated definition; ``SagaDefinitionError`` if the saga has no steps."""
        d = cls.__saga_definition__
        if d is None or not d.steps:
            raise SagaDefinitionError(f"saga {cls.__name__} has no @step methods")
        return d

    async def execute(
        self,
        orchestrator: SagaOrchestrator,
        saga_id: str | None = None,
        initial_context: Mapping[str, Any] | None = None,
    ) -> SagaResult:
        """Run this saga with ``orchestrator`` (the sketch's form of ``orchestrator.execute``)."""
        return await orchestrator.execute(self, context=initial_context, saga_id=saga_id)
