"""``Flag``, the one-object event of a run (``done``, the stop request): it must behave as the
``anyio.Event`` it replaces, on both backends."""

from __future__ import annotations

import anyio
import pytest

from saga_core._run_base import Flag

pytestmark = pytest.mark.anyio


async def test_waiters_before_and_after_set_all_return() -> None:
    flag = Flag()
    woken: list[int] = []

    async def wait(i: int) -> None:
        await flag.wait()
        woken.append(i)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(wait, i)
            await anyio.sleep(0.01)
            assert not woken and not flag.is_set()
            flag.set()
        await flag.wait()  # already set: returns
    assert sorted(woken) == [0, 1, 2] and flag.is_set()


async def test_waiting_on_a_set_flag_is_still_a_cancellable_checkpoint() -> None:
    flag = Flag()
    flag.set()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await flag.wait()
        raise AssertionError("not reached: the wait is a checkpoint")  # pragma: no cover
    assert scope.cancelled_caught


async def test_a_cancelled_waiter_leaves_the_others_waiting() -> None:
    flag = Flag()
    woken: list[str] = []

    async def wait(name: str) -> None:
        await flag.wait()
        woken.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as gone:
                tg.start_soon(wait, "kept")
                async with anyio.create_task_group() as inner:
                    inner.start_soon(wait, "cancelled")
                    await anyio.sleep(0.01)
                    gone.cancel()
            flag.set()
    assert woken == ["kept"]
