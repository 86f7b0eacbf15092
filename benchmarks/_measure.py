"""Clocks, CPU accounting, percentiles and the progress display."""

from __future__ import annotations

import gc
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.nan


@dataclass
class Span:
    """Wall time and CPU of this process (all its threads) over one measured phase, plus the
    whole machine's busy CPU when psutil is installed (the database server's share shows there)."""

    wall: float = 0.0
    cpu: float = 0.0
    machine_busy: float | None = None

    @property
    def cpu_cores(self) -> float:
        """Average cores of this process busy during the span."""
        return self.cpu / self.wall if self.wall > 0 else math.nan


class Meter:
    """``with Meter() as m: ...`` then ``m.span``."""

    def __init__(self) -> None:
        self.span = Span()
        self._t0 = 0.0
        self._c0 = 0.0
        self._sys0: Any = None

    def __enter__(self) -> Meter:
        self._sys0 = _machine_times()
        self._c0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._c0
        busy = None
        end = _machine_times()
        if self._sys0 is not None and end is not None:
            idle = (end.idle + getattr(end, "iowait", 0.0)) - (
                self._sys0.idle + getattr(self._sys0, "iowait", 0.0)
            )
            cores = os.cpu_count() or 1
            busy = max(0.0, cores - idle / wall) if wall > 0 else None
        self.span = Span(wall, cpu, busy)


def _machine_times() -> Any:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.cpu_times()


#: How ``--gc-threshold`` reaches the peers' processes (they copy our environment).
GC_ENV = "SAGA_BENCH_GC_THRESHOLD"


def parse_gc_threshold(text: str) -> tuple[int, int, int]:
    """``"700,10,100"`` as ``gc.set_threshold`` arguments; ValueError naming what is wrong."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1:
        raise ValueError(
            f"GC threshold {text!r}: expected three non-negative integers G0,G1,G2 with G0 >= 1 "
            "(Python's default is 700,10,10)"
        )
    g0, g1, g2 = (int(p) for p in parts)
    return g0, g1, g2


def apply_gc_threshold() -> None:
    """Set the garbage collector's thresholds from ``GC_ENV`` if it is set (ours and peers:
    every engine of a run is measured with the same collector settings)."""
    text = os.environ.get(GC_ENV)
    if text:
        gc.set_threshold(*parse_gc_threshold(text))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gc_threshold": list(gc.get_threshold()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    versions: dict[str, str] = {}
    from importlib import metadata

    for dist in (
        "saga-outbox",
        "sqlalchemy",
        "psycopg",
        "kafka-python",
        "aio-pika",
        "redis",
        "anyio",
        "sagaz",
        "dbos",
        "asyncpg",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    info["versions"] = versions
    info["commit"] = _git_commit()
    return info


def _git_commit() -> str | None:
    """The checkout's commit (and whether it had local changes), if this is a git checkout."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+local changes" if dirty else "")


class Progress:
    """One line per step on stderr; on a terminal, a live line with the elapsed time."""

    def __init__(self, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.perf_counter()
        self._label = ""

    def step(self, label: str) -> None:
        """Start step ``label`` (the previous one is done)."""
        if self._label:
            self.done += 1
        self._label = label
        self._show()

    def note(self, text: str) -> None:
        """Say something about the current step (e.g. why it was skipped)."""
        if self.enabled:
            self._clear()
            print(f"    {text}", file=self.stream, flush=True)

    def finish(self) -> None:
        if self._label:
            self.done += 1
            self._label = ""
        if self.enabled:
            self._clear()
            elapsed = time.perf_counter() - self.started
            line = f"[{self.done}/{self.total}] done in {elapsed:.1f}s"
            print(line, file=self.stream, flush=True)

    def _show(self) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        line = f"[{self.done + 1}/{self.total}] {elapsed:6.1f}s  {self._label}"
        if self.tty:
            print("\r\033[K" + line, end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty:
            print("\r\033[K", end="", file=self.stream, flush=True)
