"""A value per event loop, cheap to read on asyncio.

Thread limiters and write queues are bound to one event loop (anyio's ``RunVar``). Reading a
``RunVar`` asks sniffio which async library is running, several microseconds on every database
call of every saga; on asyncio the running loop is known at once, so the value is cached with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from anyio.lowlevel import RunVar

T = TypeVar("T")


class LoopLocal(Generic[T]):
    """One ``factory()`` value per event loop (asyncio or trio)."""

    def __init__(self, name: str, factory: Callable[[], T]) -> None:
        self._var: RunVar[T] = RunVar(name)
        self._factory = factory
        # (loop, value), replaced as one object: loops in other threads may read it meanwhile.
        self._cache: tuple[Any, T | None] = (None, None)

    def get(self) -> T:
        """This event loop's value, created on first use."""
        try:
            loop: Any = asyncio.get_running_loop()
        except RuntimeError:  # trio: no asyncio loop, take the RunVar path
            loop = None
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
