"""The write coalescer on its own: batching, one flush at a time, every caller answered once,
cancelled callers never stalling the others. Its database use is covered by the storage tests."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from saga_storage.coalesce import Coalescer, Pending

pytestmark = pytest.mark.anyio


class Recorder:
    """A flush that records its batches, answers each item with its argument doubled, and can
    be slowed down or made to fail."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.running = 0
        self.overlapped = False
        self.most_at_once = 0
        self._lock = threading.Lock()

    def flush(self, batch: list[Pending[int]]) -> None:
        with self._lock:
            self.running += 1
            self.overlapped |= self.running > 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.delay)
            values = [item.args[0] for item in batch]
            self.batches.append(values)
            if self.fail_on is not None and self.fail_on in values:
                raise RuntimeError(f"batch with {self.fail_on} failed")
            for item in batch:
                item.result = item.args[0] * 2
                item.done = True
        finally:
            with self._lock:
                self.running -= 1


def make(recorder: Recorder, max_batch: int = 16, max_flushes: int = 1) -> Coalescer[int]:
    async def in_thread(fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)

    return Coalescer(
        "test", recorder.flush, in_thread, max_batch=max_batch, max_flushes=max_flushes
    )


async def submit_all(co: Coalescer[int], count: int, pause_every: int = 0) -> dict[int, int]:
    """Every caller's result: ``submit(n)`` for each ``n < count``, all started at once
    (with a short pause after every ``pause_every``-th, if given)."""
    results: dict[int, int] = {}

    async def call(n: int) -> None:
        results[n] = await co.submit(n)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n in range(count):
                tg.start_soon(call, n)
                if pause_every and n % pause_every == 0:
                    await anyio.sleep(0.001)
    return results


async def test_every_caller_gets_its_own_result_from_one_flush_at_a_time() -> None:
    rec = Recorder(delay=0.002)
    results = await submit_all(make(rec), 300)
    assert results == {n: 2 * n for n in range(300)}
    flushed = [n for batch in rec.batches for n in batch]
    assert sorted(flushed) == list(range(300))  # each write flushed exactly once
    assert all(len(b) <= 16 for b in rec.batches)
    assert len(rec.batches) < 300  # writes did share flushes
    assert not rec.overlapped


async def test_with_two_flushes_allowed_two_run_at_once_and_never_more() -> None:
    """PostgreSQL storages let two batches be in flight (one transaction each): while one
    commits, the next is written. Every caller still gets its own result, each write is
    flushed once, and no third flush ever starts."""
    # 10 ms per flush: the second flush's thread must start while the first still runs (2 ms
    # was once too short for a worker thread to start on a machine slowed by tracemalloc).
    rec = Recorder(delay=0.01)
    # Arrivals spread over the flushes.
    results = await submit_all(make(rec, max_flushes=2), 600, pause_every=50)
    assert results == {n: 2 * n for n in range(600)}
    flushed = [n for batch in rec.batches for n in batch]
    assert sorted(flushed) == list(range(600))
    assert len(rec.batches) < 600
    assert rec.most_at_once == 2


async def test_two_flushes_never_flush_nothing_and_always_give_the_lead_back() -> None:
    """With two flushes allowed, a caller handed the lead must find its write still queued for
    it (a new leader arriving meanwhile must not take it), so no flush is ever empty; and every
    lead is given back: once all callers are answered, nobody leads. Arrivals come in bursts
    right after flushes end, with some callers cancelled while they wait."""
    import random

    rng = random.Random(7)
    for round_ in range(20):
        await _bursty_round(rng, round_)


async def _bursty_round(rng: Any, round_: int) -> None:
    rec = Recorder(delay=0.001)
    co = make(rec, max_batch=3, max_flushes=2)
    results: dict[int, int] = {}
    cancelled: set[int] = set()

    async def call(n: int, scope: anyio.CancelScope) -> None:
        with scope:
            results[n] = await co.submit(n)
        if scope.cancelled_caught:
            cancelled.add(n)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            scopes = []
            for n in range(120):
                scope = anyio.CancelScope()
                scopes.append(scope)
                tg.start_soon(call, n, scope)
                if rng.random() < 0.3:
                    await anyio.sleep(rng.choice((0, 0.0005, 0.001, 0.002)))
                if rng.random() < 0.05:
                    rng.choice(scopes).cancel()
    assert all(rec.batches), f"round {round_}: an empty flush"
    flushed = [n for batch in rec.batches for n in batch]
    assert sorted(flushed) == list(range(120))  # cancelled callers' writes too, once
    assert {n: 2 * n for n in results} == results
    assert set(results) | cancelled == set(range(120))
    assert co._queue.get().leaders == 0  # every lead given back
    assert rec.most_at_once <= 2


async def test_cancelled_waiters_do_not_stall_the_rest_and_are_still_written() -> None:
    rec = Recorder(delay=0.01)
    co = make(rec, max_batch=4)
    results: dict[int, int] = {}
    scopes: dict[int, anyio.CancelScope] = {}

    async def call(n: int) -> None:
        with anyio.CancelScope() as scope:
            scopes[n] = scope
            results[n] = await co.submit(n)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n in range(40):
                tg.start_soon(call, n)
            await anyio.sleep(0.015)  # the first flush is running, the rest are queued
            for n in range(1, 40, 2):
                scopes[n].cancel()
            await anyio.lowlevel.checkpoint()
        # A later caller still gets through (and flushes anything left behind).
        assert await co.submit(1000) == 2000
    kept = {n for n in range(40) if n % 2 == 0 or n in results}
    assert {n: results[n] for n in kept} == {n: 2 * n for n in kept}
    flushed = [n for batch in rec.batches for n in batch]
    assert sorted(flushed) == sorted([*range(40), 1000])  # cancelled ones written once too
    assert not rec.overlapped


async def test_a_leader_cancelled_during_its_flush_hands_the_lead_on() -> None:
    rec = Recorder(delay=0.05)
    co = make(rec, max_batch=1)
    results: dict[int, int] = {}

    async def leader() -> None:
        with anyio.CancelScope() as scope:
            leader_scope.append(scope)
            await co.submit(0)

    async def call(n: int) -> None:
        results[n] = await co.submit(n)

    leader_scope: list[anyio.CancelScope] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(leader)
            await anyio.sleep(0.01)
            for n in range(1, 6):
                tg.start_soon(call, n)
            await anyio.sleep(0.01)
            leader_scope[0].cancel()  # while its thread is flushing
    assert results == {n: 2 * n for n in range(1, 6)}
    assert sorted(n for b in rec.batches for n in b) == list(range(6))  # each written once


async def test_a_failed_flush_fails_its_own_batch_only() -> None:
    rec = Recorder(delay=0.005, fail_on=7)
    co = make(rec, max_batch=5)
    outcomes: dict[int, object] = {}

    async def call(n: int) -> None:
        try:
            outcomes[n] = await co.submit(n)
        except RuntimeError as exc:
            outcomes[n] = exc

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(call, n)
    failed_batch = next(b for b in rec.batches if 7 in b)
    for n in range(20):
        if n in failed_batch:
            assert isinstance(outcomes[n], RuntimeError)
        else:
            assert outcomes[n] == 2 * n
