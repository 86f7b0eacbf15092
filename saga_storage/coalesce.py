"""Commit coalescing: concurrent saga writes share one transaction (group commit).

Many sagas running at once each write small transactions; the commit (an fsync) dominates. The
first writer that finds no flush running becomes the leader: it takes every write queued so far
and applies them in one transaction, in queue order, each still starting with its own fenced
update. Writers arriving meanwhile queue for the next flush. Every caller returns only after the
transaction holding its write committed, so durability is what it was; a write whose lease was
lost fails alone (its fenced update matched no row, so it wrote nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

from saga_storage._loop_local import LoopLocal

T = TypeVar("T")


@dataclass
class Pending(Generic[T]):
    """One queued write and, once flushed, its outcome."""

    args: tuple[Any, ...]
    result: T | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class _Queue:
    items: list[Pending[Any]] = field(default_factory=list)
    flushing: bool = False
    flushed: anyio.Event = field(default_factory=anyio.Event)


class Coalescer(Generic[T]):
    """Runs ``flush(batch)`` for queued items, one flush at a time per event loop.

    ``flush`` runs in a worker thread (through ``run_in_thread``) and must set ``result`` or
    ``error`` on every item; an exception it raises becomes every item's error.
    """

    def __init__(
        self,
        name: str,
        flush: Callable[[list[Pending[T]]], None],
        run_in_thread: Callable[..., Any],
        max_batch: int = 256,
    ) -> None:
        self._flush = flush
        self._run_in_thread = run_in_thread
        self._max_batch = max_batch
        self._queue = LoopLocal(name, _Queue)

    async def submit(self, *args: Any) -> T:
        """Queue one write and return its result once the transaction holding it committed."""
        q = self._queue.get()
        item: Pending[T] = Pending(args)
        q.items.append(item)
        while not item.done:
            if q.flushing:
                await q.flushed.wait()
                continue
            q.flushing = True
            batch, q.items = q.items[: self._max_batch], q.items[self._max_batch :]
            try:
                await self._run_in_thread(self._flush_all, batch)
            finally:
                q.flushing = False
                flushed, q.flushed = q.flushed, anyio.Event()
                flushed.set()
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    def _flush_all(self, batch: list[Pending[T]]) -> None:
        try:
            self._flush(batch)
        except BaseException as exc:
            for item in batch:
                if not item.done:
                    item.error = exc
                    item.done = True
            if not isinstance(exc, Exception):
                raise
