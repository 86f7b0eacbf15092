"""Calling user code: async functions in the saga's task, sync ones in worker threads.

Worker threads cannot be interrupted. A sync call that outlives its timeout (or whose waiter is
cancelled) is reported at once as :class:`ThreadStillRunning`, and the thread is handed to a
background task that waits for it, so it is never abandoned silently and its real outcome can
still be recorded.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

_local = threading.local()


def in_step_thread() -> bool:
    """Whether the current thread is running a saga's sync step or compensation."""
    return bool(getattr(_local, "active", False))


@contextlib.contextmanager
def step_thread() -> Iterator[None]:
    """Mark the current thread as running user step code (for the deadlock checks)."""
    _local.active = True
    try:
        yield
    finally:
        _local.active = False


class StepTimeout(TimeoutError):
    """An attempt ran past its timeout; its outcome is unknown."""


class ThreadStillRunning(StepTimeout):
    """A sync call was given up on while its thread still runs (timeout or cancellation)."""

    def __init__(self, message: str, watch: ThreadWatch) -> None:
        super().__init__(message)
        self.watch = watch


@dataclass
class ThreadWatch:
    """A worker thread's eventual outcome."""

    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None
    #: Set once the saga has recorded what a given-up thread really did.
    late_recorded: anyio.Event = field(default_factory=anyio.Event)


async def call_user(
    fn: Callable[..., Any],
    arg: Any,
    *,
    is_async: bool,
    timeout: float | None,
    what: str,
    limiter: anyio.CapacityLimiter | None,
    background: TaskGroup | None,
    on_thread: Callable[[ThreadWatch], None],
) -> Any:
    """Call ``fn(arg)`` with a per-attempt timeout (``StepTimeout`` when exceeded).

    A sync ``fn`` runs in a worker thread whose :class:`ThreadWatch` is given to ``on_thread``
    first, so the caller can still wait for the thread if this call is cancelled; ``limiter``
    bounds those threads, and the thread's waiter runs in ``background`` (a sync ``fn`` needs
    both).
    """
    if is_async:
        coro_fn: Callable[[Any], Awaitable[Any]] = fn
        if timeout is None:
            return await coro_fn(arg)
        with anyio.move_on_after(timeout) as scope:
            return await coro_fn(arg)
        if scope.cancelled_caught:
            raise StepTimeout(f"{what} timed out after {timeout:g}s")
        raise AssertionError("unreachable")  # pragma: no cover

    if limiter is None or background is None:
        raise ValueError(f"{what}: a sync call needs a thread limiter and a task group")
    watch = ThreadWatch()

    def target() -> None:
        with step_thread():
            try:
                watch.result = fn(arg)
            except BaseException as exc:  # handed back to the waiting task
                watch.error = exc

    async def run_thread() -> None:
        # Not abandoned on cancellation: this task lives until the thread returns.
        await anyio.to_thread.run_sync(target, limiter=limiter)
        watch.done.set()

    on_thread(watch)
    background.start_soon(run_thread)
    started = time.monotonic()
    with anyio.move_on_after(timeout if timeout is not None else math.inf):
        await watch.done.wait()
    if not watch.done.is_set():
        elapsed = time.monotonic() - started
        raise ThreadStillRunning(
            f"{what} timed out after {elapsed:.3g}s (its thread still runs)", watch
        )
    if watch.error is not None:
        raise watch.error
    return watch.result
