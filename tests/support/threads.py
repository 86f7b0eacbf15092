"""Running a test's workers in threads of their own."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_threads(
    target: Callable[[int], None], count: int, timeout: float = 30.0
) -> list[BaseException]:
    """``target(i)`` for each ``i < count``, each in a thread of its own, released together (a
    barrier) so they overlap; waits for them (``timeout`` each) and returns what they raised."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # collected for the test to assert on
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        errors.append(TimeoutError(f"a worker thread still runs after {timeout}s"))
    return errors
