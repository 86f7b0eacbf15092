"""Per-event-loop state and the anyio primitives built without a backend lookup
(``saga_core._loop_local``), under asyncio and trio."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from saga_core._loop_local import LoopLocal, cancel_scope, new_event

pytestmark = pytest.mark.anyio


async def test_cancel_scopes_and_events_are_anyio_s_and_work() -> None:
    scope = cancel_scope()
    assert isinstance(scope, anyio.CancelScope)
    assert cancel_scope(shield=True).shield
    with scope:
        scope.cancel()
        await anyio.sleep(1)
        pytest.fail("not cancelled")
    assert scope.cancelled_caught

    event = new_event()
    assert isinstance(event, anyio.Event)
    async with anyio.create_task_group() as tg:
        tg.start_soon(event.wait)
        await anyio.lowlevel.checkpoint()
        event.set()
    assert event.is_set()


def test_a_loop_local_value_is_one_per_event_loop(anyio_backend: str) -> None:
    made: list[object] = []

    def factory() -> object:
        made.append(object())
        return made[-1]

    local: LoopLocal[object] = LoopLocal("test_value", factory)

    async def twice() -> tuple[object, object]:
        return local.get(), local.get()

    first = anyio.run(twice, backend=anyio_backend)
    second = anyio.run(twice, backend=anyio_backend)
    assert first[0] is first[1] and second[0] is second[1]  # one per loop
    assert first[0] is not second[0] and len(made) == 2  # a new loop gets a new one
