"""Commit coalescing: concurrent saga writes share one transaction (group commit).

Many sagas running at once each write small transactions; the commit (an fsync) dominates. The
first writer that finds nobody leading becomes the leader: it takes the writes queued so far (up
to ``max_batch``) and applies them in one transaction, each still starting with its own fenced
update. Writers arriving meanwhile queue; when the leader's own write is done it hands the lead
to the oldest waiting writer, which flushes the next batch. Every caller returns only after the
transaction holding its write committed, so durability is what it was; a write whose lease was
lost fails alone (its fenced update matched no row, so it wrote nothing).

A storage may let ``max_flushes`` batches be in flight at once (PostgreSQL: two), each in its
own transaction; the next writer to arrive while fewer run leads a new one. A write whose caller
was handed the lead stays for that caller to flush.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

from saga_core._loop_local import LoopLocal, asyncio_loop

T = TypeVar("T")


@dataclass
class Pending(Generic[T]):
    """One queued write and, once flushed, its outcome."""

    args: tuple[Any, ...]
    result: T | None = None
    error: BaseException | None = None
    done: bool = False
    #: Set once: when the write is done, or when its caller is to lead the next flush.
    wake: _Wake | asyncio.Future[None] | None = None
    lead: bool = False


class _Wake:
    """A one-shot wake-up with a future's interface (``done``, ``set_result``, ``await``) for
    trio; on asyncio a bare ``asyncio.Future`` is used instead (an ``anyio.Event`` is an
    asyncio event, its deque and a future: thousands of waiting sagas, each woken once)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def done(self) -> bool:
        return self._event.is_set()

    def set_result(self, _value: None) -> None:
        self._event.set()

    def __await__(self) -> Generator[Any, Any, None]:
        return self._event.wait().__await__()


def _set(wake: _Wake | asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


@dataclass
class _Queue:
    items: list[Pending[Any]] = field(default_factory=list)
    #: How many lead: flushes running, or leads being handed to a waiting caller.
    leaders: int = 0


class Coalescer(Generic[T]):
    """Runs ``flush(batch)`` for queued items, up to ``max_flushes`` at a time per event loop.

    ``flush`` runs in a worker thread (through ``run_in_thread``) and must set ``result`` or
    ``error`` on every item; an exception it raises becomes every item's error. Each waiting
    caller is woken once: when its write is done, or to lead the next flush (waking every
    waiter after every flush made thousands of waiting sagas cost more than the writes).
    """

    def __init__(
        self,
        name: str,
        flush: Callable[[list[Pending[T]]], None],
        run_in_thread: Callable[..., Any],
        max_batch: int = 256,
        max_flushes: int = 1,
    ) -> None:
        self._flush = flush
        self._run_in_thread = run_in_thread
        self._max_batch = max_batch
        self._max_flushes = max_flushes
        self._queue = LoopLocal(name, _Queue)

    async def submit(self, *args: Any) -> T:
        """Queue one write and return its result once the transaction holding it committed."""
        loop = asyncio_loop()
        q = self._queue.get_on(loop)
        item: Pending[T] = Pending(args)
        q.items.append(item)
        if q.leaders >= self._max_flushes:
            wake = item.wake = loop.create_future() if loop is not None else _Wake()
            try:
                await wake
            except BaseException:
                # Cancelled while waiting: the write stays queued (it is flushed anyway, its
                # outcome unknown to this caller). Nobody waits on it now, so it must not be
                # handed the lead (the wake being done says so: a cancelled future is); a
                # lead handed to us goes on, and the write becomes anyone's to flush.
                _set(wake)
                if item.lead:
                    item.lead = False
                    self._hand_over(q)
                raise
        else:
            q.leaders += 1
        if not item.done:  # we lead: flush the oldest writes until ours is among them
            while True:
                batch = self._take_batch(q, item)
                try:
                    await self._run_in_thread(self._flush_all, batch)
                except BaseException:  # cancelled: whatever is still queued needs a leader
                    # Cancelled before the thread started: the batch was never written.
                    item.lead = False
                    q.items[:0] = [other for other in batch if not other.done]
                    self._wake_done(batch)
                    self._hand_over(q)
                    raise
                self._wake_done(batch)
                if item.done:
                    self._hand_over(q)  # only the leader hands over, once
                    break
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    def _take_batch(self, q: _Queue, own: Pending[T]) -> list[Pending[T]]:
        """The oldest queued writes, up to ``max_batch``, but not a write whose caller was
        handed the lead and has not resumed yet: that caller flushes it (with two flushes
        allowed, a new leader could otherwise take it, and its caller would lead with
        nothing of its own to wait for)."""
        if not any(other.lead and other is not own for other in q.items[: self._max_batch]):
            batch, q.items = q.items[: self._max_batch], q.items[self._max_batch :]
            return batch
        batch, rest = [], []
        for other in q.items:
            if len(batch) < self._max_batch and (other is own or not other.lead):
                batch.append(other)
            else:
                rest.append(other)
        q.items = rest
        return batch

    @staticmethod
    def _wake_done(batch: list[Pending[T]]) -> None:
        for done in batch:
            if done.done and done.wake is not None:
                _set(done.wake)

    @staticmethod
    def _hand_over(q: _Queue) -> None:
        """Wake the oldest waiting write's caller to lead the next flush, or stop leading."""
        for waiting in q.items:
            if waiting.wake is not None and not waiting.wake.done():
                waiting.lead = True
                waiting.wake.set_result(None)
                return
        q.leaders -= 1

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
