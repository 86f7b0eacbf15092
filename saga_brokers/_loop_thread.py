"""A private asyncio event loop in a thread of its own, callable from asyncio or trio.

aio-pika only runs on asyncio. Running it on a loop of its own lets the RabbitMQ adapter serve
callers on any anyio backend: coroutines are submitted thread-safely and their completion wakes
the caller's loop without parking a worker thread per call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

logger = logging.getLogger(__name__)

_Waker = Callable[[Callable[[], object]], object]


def _threadsafe_waker() -> _Waker:
    """How another thread schedules a callback on the caller's event loop, without blocking."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: anyio's only other backend is trio
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    return loop.call_soon_threadsafe


class LoopThread:
    """Runs an asyncio loop in a daemon thread, started on first use and stopped by :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=self._main, args=(loop,), name=self._name)
                thread.daemon = True  # a forgotten aclose() must not keep the process alive
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _main(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            # Cancelling a task can start others (aio-pika closes a connection in a task of
            # its own): repeat until none is left, so no coroutine is dropped half-way.
            for _ in range(10):
                pending = asyncio.all_tasks(loop)
                if not pending:
                    break
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def run(
        self,
        factory: Callable[[], Coroutine[Any, Any, T]],
        *,
        on_orphan: Callable[[T], object] | None = None,
    ) -> T:
        """Run ``factory()`` on the private loop and return its result to the calling task.

        Cancelling the caller cancels the coroutine. If it had already finished, its result
        goes to ``on_orphan`` so that nothing it took is lost; that callback may run on any
        thread, so it should only schedule work (see :meth:`call_soon`).
        """
        loop = self._ensure_loop()
        future = asyncio.run_coroutine_threadsafe(factory(), loop)
        done = anyio.Event()
        wake = _threadsafe_waker()

        def _wake(_: concurrent.futures.Future[T]) -> None:
            # RuntimeError: the caller's loop is gone; nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                wake(done.set)

        future.add_done_callback(_wake)
        try:
            await done.wait()
        except BaseException:
            if not future.cancel() and on_orphan is not None:
                future.add_done_callback(lambda f: _hand_over(f, on_orphan))
            raise
        return future.result()

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Schedule ``callback`` on the private loop, if it runs."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback)

    def stop(self, timeout: float) -> None:
        """Stop the loop (cancelling what still runs on it) and wait for its thread. Blocking."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # already closed
            return
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("event loop thread %s did not stop within %.1fs", self._name, timeout)


def _hand_over(future: concurrent.futures.Future[T], on_orphan: Callable[[T], object]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    try:
        on_orphan(future.result())
    except Exception:  # runs as a future callback: report, never raise into the loop
        logger.exception("handing over an orphaned result failed")
