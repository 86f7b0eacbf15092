"""A finished saga run leaves no reference cycles behind.

Objects in a cycle are freed only by the garbage collector. With thousands of sagas in flight,
every cycle a run leaves makes the collector's full passes more frequent and longer; they cost
more than the runs themselves (docs/benchmarks.md). The runs here must be freed by reference
counting alone: with the collector paused and keeping what it finds (``DEBUG_SAVEALL``), a
collection after the runs finds nothing from the engine.

Only runs that complete: a failed step's exception is kept for the caller (``SagaFailed``),
and its traceback refers to the frames of the run that caught it.
"""

from __future__ import annotations

import gc
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from saga_core import DeclarativeSaga, SagaOrchestrator, StepContext, step
from saga_storage import SqlStorage
from tests.engine.sagas import ChainSaga

pytestmark = pytest.mark.anyio


def _engine_object(obj: Any) -> bool:
    """Whether ``obj`` belongs to a saga run: an engine object, or a frame of engine code."""
    if isinstance(obj, types.FrameType):
        return "saga_core" in obj.f_code.co_filename
    return type(obj).__module__.startswith(("saga_core", "saga_storage", "tests.engine"))


class FanSaga(DeclarativeSaga):
    """root -> (left, right in parallel, right in a thread) -> join."""

    saga_type = "test-garbage-fan"

    @step()
    async def root(self, ctx: StepContext) -> dict[str, Any]:
        return {"root": 1}

    @step(depends_on=["root"])
    async def left(self, ctx: StepContext) -> dict[str, Any]:
        return {"left": 1}

    @step(depends_on=["root"])
    def right(self, ctx: StepContext) -> dict[str, Any]:
        return {"right": 1}

    @step(depends_on=["left", "right"])
    async def join(self, ctx: StepContext) -> dict[str, Any]:
        return {"join": ctx["left"] + ctx["right"]}


@pytest.fixture
def saved_garbage() -> Iterator[list[Any]]:
    """Collector paused; ``collect()`` afterwards keeps what it would free in the list."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


async def _warm(orch: SagaOrchestrator) -> None:
    # First runs fill caches (compiled statements, definitions) that are not garbage.
    await orch.execute(ChainSaga(), {}, saga_id=f"warm-{uuid.uuid4().hex[:8]}")


async def test_completed_runs_leave_no_cycles(
    storage: SqlStorage, saved_garbage: list[Any]
) -> None:
    orch = SagaOrchestrator(storage)
    await _warm(orch)
    gc.collect()
    saved_garbage.clear()
    for _ in range(3):
        await orch.execute(ChainSaga(), {})  # a chain: one step after another
        assert (await orch.execute(FanSaga(), {}))["join"] == 2  # parallel steps
    gc.collect()
    found = [o for o in saved_garbage if _engine_object(o)]
    assert not found, f"{len(found)} engine objects in reference cycles, e.g. {found[:5]!r}"
