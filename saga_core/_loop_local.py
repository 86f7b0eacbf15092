"""Per-event-loop state and anyio primitives, cheap to reach on asyncio.

anyio finds out which async library is running by asking sniffio, which on asyncio looks up
the current task: several microseconds, paid by every ``RunVar`` read and by every
``anyio.Event()`` and ``anyio.CancelScope()`` built. A saga run reads or builds several of them
per step, thousands of runs at once. On asyncio the running loop is known at once
(``asyncio.get_running_loop``, a C call), so what depends only on the loop is cached with it.
On trio every call takes anyio's own path.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
from anyio.lowlevel import RunVar

T = TypeVar("T")

__all__ = ["LoopLocal", "asyncio_loop", "cancel_scope", "new_event"]


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None under trio."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class LoopLocal(Generic[T]):
    """One ``factory()`` value per event loop (asyncio or trio)."""

    def __init__(self, name: str, factory: Callable[[], T]) -> None:
        self._var: RunVar[T] = RunVar(name)
        self._factory = factory
        # (loop, value), replaced as one object: loops in other threads may read it meanwhile.
        self._cache: tuple[Any, T | None] = (None, None)

    def get(self) -> T:
        """This event loop's value, created on first use."""
        return self.get_on(asyncio_loop())

    def get_on(self, loop: asyncio.AbstractEventLoop | None) -> T:
        """``get()`` when the caller already knows the running asyncio loop (None: trio)."""
        cache = self._cache
        if loop is not None and cache[0] is loop:
            return cache[1]  # type: ignore[return-value]
        try:
            value = self._var.get()
        except LookupError:
            value = self._factory()
            self._var.set(value)
        if loop is not None:
            self._cache = (loop, value)
        return value


class _Kinds:
    """The asyncio backend's concrete classes behind ``anyio.CancelScope`` and ``anyio.Event``.

    Those names are factories: each call asks which backend runs and builds that backend's
    class. Building the concrete class directly gives the same object without the question.
    The classes are the same on every asyncio loop, so they are found once (on the first call
    under asyncio, which is where ``anyio.CancelScope()`` names the asyncio class).
    """

    def __init__(self) -> None:
        self.scope: Callable[..., anyio.CancelScope] = type(anyio.CancelScope())
        self.event: Callable[[], anyio.Event] = type(anyio.Event())


@functools.cache
def _asyncio_kinds() -> _Kinds:
    return _Kinds()


def cancel_scope(*, shield: bool = False) -> anyio.CancelScope:
    """``anyio.CancelScope(shield=shield)``, without the backend lookup on asyncio."""
    if asyncio_loop() is None:
        return anyio.CancelScope(shield=shield)
    return _asyncio_kinds().scope(shield=shield)


def new_event() -> anyio.Event:
    """``anyio.Event()``, without the backend lookup on asyncio."""
    if asyncio_loop() is None:
        return anyio.Event()
    return _asyncio_kinds().event()
