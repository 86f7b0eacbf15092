"""Fixtures for the crash and recovery tests: a PostgreSQL schema per test, worker processes
that can be killed, paused and restarted, and a private PostgreSQL server that can be stopped.

Every process a test starts is in a session of its own and is killed (the whole process group)
when the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text

from saga_storage import create_storage
from tests.recovery.app import EFFECTS_DDL, STORE_DDL, conninfo
from tests.support.services import free_port, require, require_server

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get(
    "SAGA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SETTLED = ("COMPLETED", "COMPENSATED", "FAILED")


@dataclass(frozen=True)
class Database:
    """A schema of its own in the shared PostgreSQL: the saga store and the effects tables."""

    url: str  # SQLAlchemy URL, for the storage
    dsn: str  # libpq URI, for psycopg
    schema: str


def prepare_store(url: str) -> None:
    """Create the library's tables (migrations) and the application's, for ``url``."""
    storage = create_storage(url)
    storage.dispose()
    with psycopg.connect(conninfo(url), autocommit=True) as c:
        c.execute(STORE_DDL)


@pytest.fixture
def pg_db() -> Iterator[Database]:
    require_server("127.0.0.1", 5432, "PostgreSQL")
    schema = f"r_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    db = Database(url, conninfo(url), schema)
    try:
        prepare_store(url)
        with psycopg.connect(db.dsn, autocommit=True) as c:
            c.execute(EFFECTS_DDL)
        yield db
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


# --- worker processes ------------------------------------------------------------------------


@dataclass
class Workers:
    """Worker processes (``python -m tests.recovery.app worker``) in named slots.

    A slot keeps one log file across restarts. Processes that die by SIGKILL (injected by the
    test or by a crash token) are remembered in ``killed``; any other death while the test
    runs is an ``unexpected`` exit.
    """

    log_dir: Path
    store_url: str
    effects_dsn: str
    concurrency: int = 4
    lease: float = 1.0
    poll: float = 0.25
    max_crashes: int = 1000
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    every: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    restarts: int = 0
    _reaped: set[int] = field(default_factory=set)
    _termed: set[int] = field(default_factory=set)

    def log_path(self, slot: str) -> Path:
        return self.log_dir / f"worker-{slot}.log"

    def start(self, slot: str) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable,
            "-m",
            "tests.recovery.app",
            "worker",
            "--store",
            self.store_url,
            "--effects",
            self.effects_dsn,
            "--concurrency",
            str(self.concurrency),
            "--lease",
            str(self.lease),
            "--poll",
            str(self.poll),
            "--max-crashes",
            str(self.max_crashes),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with self.log_path(slot).open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[slot] = proc
        self.every.append(proc)
        return proc

    def pid(self, slot: str) -> int:
        return self.procs[slot].pid

    def reap(self) -> list[str]:
        """Slots whose process has ended (noting how it ended)."""
        dead = []
        for slot, proc in self.procs.items():
            rc = proc.poll()
            if rc is None or proc.pid in self._reaped:
                continue
            self._reaped.add(proc.pid)
            dead.append(slot)
            if rc == -signal.SIGKILL:
                self.killed.add(proc.pid)
            else:
                self.unexpected.append(
                    f"worker {slot} (pid {proc.pid}) exited with {rc}:\n{self.tail(slot)}"
                )
        return dead

    def restart_dead(self) -> int:
        dead = self.reap()
        for slot in dead:
            self.start(slot)
        self.restarts += len(dead)
        return len(dead)

    def kill(self, slot: str) -> int:
        """SIGKILL the slot's process (and wait for it)."""
        proc = self.procs[slot]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return proc.pid

    def stop(self, slot: str, timeout: float = 15.0) -> int:
        """Stop the slot's process gracefully (one SIGTERM: a second one kills a worker that is
        shutting down); its exit code."""
        self._terminate(slot)
        proc = self.procs[slot]
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
        return int(proc.returncode)

    def _terminate(self, slot: str) -> None:
        proc = self.procs[slot]
        # A worker restarted a moment ago may still be importing: SIGTERM would kill it before
        # it can stop gracefully, which is not what these tests check. Wait until it runs.
        deadline = time.monotonic() + 30
        started = f"started (pid {proc.pid})"
        while proc.poll() is None and time.monotonic() < deadline:
            if started in self.log_path(slot).read_text(errors="replace"):
                break
            time.sleep(0.02)
        if proc.poll() is None and proc.pid not in self._termed:
            self._termed.add(proc.pid)
            proc.send_signal(signal.SIGTERM)

    def stop_all(self) -> dict[str, int]:
        for slot in self.procs:
            self._terminate(slot)
        return {slot: self.stop(slot) for slot in self.procs}

    def close(self) -> None:
        for proc in self.every:
            _kill_group(proc)

    def tail(self, slot: str, lines: int = 30) -> str:
        try:
            text_ = self.log_path(slot).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text_.splitlines()[-lines:])

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log"))
        )

    def lost_sagas(self) -> set[str]:
        """Saga ids some worker logged losing the lease of."""
        return set(re.findall(r"saga (\S+): lease lost", self.logs()))

    def errors(self) -> list[str]:
        """Log lines at ERROR level or starting a traceback (a worker hiding a failure)."""
        return [
            line
            for line in self.logs().splitlines()
            if " ERROR " in line or line.startswith("Traceback")
        ]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def make_workers(tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    """``make_workers(store_url, effects_dsn, concurrency=, lease=, poll=)``: a ``Workers``
    whose processes are all killed when the test ends."""
    made: list[Workers] = []

    def make(store_url: str, effects_dsn: str, **options: Any) -> Workers:
        log_dir = tmp_path / f"workers-{len(made)}"
        log_dir.mkdir()
        w = Workers(log_dir, store_url, effects_dsn, **options)
        made.append(w)
        return w

    try:
        yield make
    finally:
        for w in made:
            w.close()


# --- a private PostgreSQL server ---------------------------------------------------------------


def _pg_bindir() -> Path | None:
    candidates = [os.environ.get("SAGA_TEST_PG_BINDIR", "")]
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(map(str, Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of this test alone, which it may stop and start at will."""

    bindir: Path
    base: Path
    port: int
    run_as: list[str]

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def logfile(self) -> Path:
        return self.base / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        cmd = [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args]
        done = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                + self.log_tail()
            )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-l", str(self.logfile), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    bindir = _pg_bindir()
    require(bindir is not None, "PostgreSQL server binaries (initdb, pg_ctl)")
    assert bindir is not None
    run_as: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="saga-pg-"))
    try:
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                user = None
            require(user is not None, "a 'postgres' user to run a private PostgreSQL as")
            assert user is not None
            os.chown(base, user.pw_uid, user.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        os.chmod(base, 0o700)
        init = [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(base / "data"),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]
        done = subprocess.run(init, cwd=base, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.fail(f"initdb failed: {done.stdout}{done.stderr}", pytrace=False)
        pg = PrivatePostgres(bindir, base, free_port(), run_as)
        pg.start()
        try:
            yield pg
        finally:
            if pg.running():
                with contextlib.suppress(RuntimeError):
                    pg.stop("immediate")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll ``predicate`` until it is true, or fail saying ``what`` did not happen in time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}", pytrace=False)
        time.sleep(interval)
