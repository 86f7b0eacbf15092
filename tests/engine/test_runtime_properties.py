"""Run-time properties of the orchestrator on random sagas, on a real SQLite file.

For random DAGs with random compensation sets and explicit compensation edges (only accepted
definitions), random sync/async steps with random delays, and at most one failing step (a clean
rejection or an unknown outcome):

* forward execution never starts a step before all its dependencies finished;
* a saga without failure completes and compensates nothing;
* with a failure, each *affected* step (has a compensation, and succeeded or failed with an
  unknown outcome) is compensated exactly once, only after every affected predecessor in ``P``
  finished compensating; nothing unaffected is compensated; no compensation starts before
  every forward step in flight finished (the default strategy).

``P`` comes from the independent reference model in ``tests/core/strategies.py``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga_core import SagaFailed, SagaOrchestrator, SagaStatus, StepRejected
from saga_storage import SqlStorage, create_storage
from tests.core.strategies import (
    SagaSpec,
    build_saga_class,
    expected_compensation,
    valid_saga_specs,
)

_counter = itertools.count()


@pytest.fixture(scope="module")
def shared_storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlStorage]:
    path: Path = tmp_path_factory.mktemp("props") / "saga.db"
    s = create_storage(f"sqlite:///{path}")
    yield s
    s.dispose()


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[SagaSpec, str | None, str, dict[str, float], set[str], str]:
    spec = draw(valid_saga_specs(max_steps=7))
    failing = draw(st.none() | st.sampled_from(spec.steps))
    how = draw(st.sampled_from(["rejected", "unknown"]))
    delays = {s: draw(st.sampled_from([0.0, 0.001, 0.004])) for s in spec.steps}
    sync_steps = {s for s in spec.steps if draw(st.booleans())}
    backend = draw(st.sampled_from(["asyncio", "trio"]))
    return spec, failing, how, delays, sync_steps, backend


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_forward_and_compensation_order(
    shared_storage: SqlStorage,
    scenario: tuple[SagaSpec, str | None, str, dict[str, float], set[str], str],
) -> None:
    spec, failing, how, delays, sync_steps, backend = scenario
    log: list[tuple[str, str]] = []
    lock = threading.Lock()

    def note(kind: str, name: str) -> None:
        with lock:
            log.append((kind, name))

    def make_action(name: str) -> Callable[..., Any]:
        def fail() -> None:
            if name == failing:
                raise StepRejected("no") if how == "rejected" else RuntimeError("lost reply")

        if name in sync_steps:

            def sync_action(self: Any, ctx: Any) -> dict[str, Any]:
                note("start", name)
                time.sleep(delays[name])
                fail()
                note("end", name)
                return {name: True}

            return sync_action

        async def async_action(self: Any, ctx: Any) -> dict[str, Any]:
            note("start", name)
            await anyio.sleep(delays[name])
            fail()
            note("end", name)
            return {name: True}

        return async_action

    def make_compensation(name: str) -> Callable[..., Any]:
        async def undo(self: Any, ctx: Any) -> None:
            note("undo-start", name)
            await anyio.sleep(delays[name] / 2)
            note("undo", name)

        return undo

    cls = build_saga_class(
        spec,
        f"PropSaga{next(_counter)}",
        make_action=make_action,
        make_compensation=make_compensation,
        attrs={"saga_type": f"prop-{next(_counter)}"},
    )

    async def run() -> Any:
        try:
            return await SagaOrchestrator(shared_storage).execute(cls(), context={})
        except SagaFailed as exc:
            return exc

    outcome = anyio.run(run, backend=backend)
    pos = {event: i for i, event in enumerate(log)}

    # Forward: a step starts only after every dependency ended.
    for s in spec.steps:
        if ("start", s) in pos:
            for d in spec.depends_on.get(s, ()):
                assert ("end", d) in pos and pos[("end", d)] < pos[("start", s)], (s, d, log)

    undos = [name for kind, name in log if kind == "undo"]
    if failing is None:
        assert not isinstance(outcome, SagaFailed), outcome
        assert undos == []
        assert {n for k, n in log if k == "end"} == set(spec.steps)
        return

    assert isinstance(outcome, SagaFailed)
    assert outcome.status == SagaStatus.COMPENSATED
    assert outcome.step == failing
    succeeded = {n for k, n in log if k == "end"}
    affected = set(spec.compensatable) & (succeeded | ({failing} if how == "unknown" else set()))
    assert sorted(undos) == sorted(affected), (affected, log)  # each exactly once, nothing else
    p = expected_compensation(spec).precedence
    for t, s in p:
        if t in affected and s in affected:
            assert pos[("undo", t)] < pos[("undo-start", s)], (t, s, log)
    # Default strategy: compensation starts only once nothing runs forward any more.
    first_undo = min((pos[("undo-start", s)] for s in affected), default=len(log))
    for s in spec.steps:
        if ("start", s) in pos and s != failing:
            assert pos[("end", s)] < first_undo, (s, log)
