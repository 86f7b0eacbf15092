"""RabbitMQ adapter (``amqp://``, ``amqps://``) on aio-pika.

Topology: each topic is a durable *topic exchange* of the same name; a message's routing key is
its ``event_type``. A consumer group is a durable queue named after the group, bound to each of
its topics' exchanges with ``#``; its dead letters go to exchange and queue ``<group>.dlq``.

aio-pika is asyncio-only, so all of it runs on a private asyncio loop in a thread of its own
(:class:`~saga_brokers._loop_thread.LoopThread`); the public methods work under asyncio and trio.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit

import aio_pika
import anyio
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import (
    AMQPChannelError,
    DeliveryError,
    PublishError,
)

from saga_brokers._common import dead_letter_copy, fail_rest_of_key
from saga_brokers._loop_thread import LoopThread
from saga_brokers._url import parse_url, redact_url
from saga_core.consumer import Delivery, dead_letter_topic, default_consumer_name
from saga_core.errors import BrokerError, BrokerUnavailable, PublishFailed
from saga_core.events import Message

__all__ = ["RabbitMQBroker", "RabbitMQConsumer"]

logger = logging.getLogger(__name__)

#: What losing the connection looks like: timeouts, socket errors, and aio-pika's
#: RuntimeError("... closed") for a connection or channel that died in between.
_LINK_ERRORS = (asyncio.TimeoutError, OSError, RuntimeError)

#: AMQP header carrying the message key (AMQP has no key of its own); removed on receipt.
KEY_HEADER = "message_key"


class RabbitMQBroker:
    """Publishes with publisher confirms and ``mandatory``; consumes with manual acks.

    An acknowledgement means RabbitMQ confirmed the persistent message after routing it to at
    least one queue (durable queues: written to disk). A message no queue is bound for comes
    back as ``PublishFailed``. Every operation is bounded by ``timeout`` seconds; when the
    broker cannot be reached ``BrokerUnavailable`` is raised and the next call reconnects.

    Args:
        url: ``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS).
        timeout: seconds allowed to connect, or to publish one batch and get it confirmed.
        prefetch: how many unacknowledged messages a consumer may hold.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, prefetch: int = 100) -> None:
        self._url = url
        self._redacted = redact_url(url)
        self.timeout = timeout
        self.prefetch = prefetch
        self._loop = LoopThread("saga-rabbitmq")
        self._closed = False
        # Touched only on the private loop:
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._setup_lock: asyncio.Lock | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"RabbitMQBroker({self._redacted!r})"

    # -- public surface (any anyio backend) ------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        """Publish on one confirm channel: a key's messages one after the other (each after the
        previous confirm), different keys together. See the class docstring for what ``None``
        means."""
        self._check_open()
        if not messages:
            return []
        batch = list(messages)
        results = await self._loop.run(lambda: self._publish(batch))
        return fail_rest_of_key(batch, results)

    async def consumer(
        self, topics: Sequence[str], group: str, *, name: str | None = None
    ) -> RabbitMQConsumer:
        """Declare queue ``group`` (bound to every topic's exchange) and its dead-letter queue,
        and start consuming from it."""
        if isinstance(topics, str) or not topics:
            raise ValueError("consumer() needs a non-empty sequence of topic names")
        self._check_open()
        consumer = RabbitMQConsumer(self, tuple(topics), group, name or default_consumer_name())
        await self._loop.run(consumer._start)
        return consumer

    async def aclose(self) -> None:
        """Close the connection and stop the private loop."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._loop.run(self._shutdown)
            finally:
                await anyio.to_thread.run_sync(
                    self._loop.stop, self.timeout, limiter=anyio.CapacityLimiter(1)
                )

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerUnavailable(f"{self!r} is closed")

    # -- private loop ------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> BrokerUnavailable:
        self._drop_connection()
        detail = str(exc) or type(exc).__name__
        return BrokerUnavailable(f"RabbitMQ at {self._redacted} is unavailable: {detail}")

    def _drop_connection(self) -> None:
        connection = self._connection
        self._connection = self._channel = None
        self._exchanges.clear()
        if connection is not None and not connection.is_closed:
            self._spawn(connection.close())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(_forget(self._background))

    async def _connect(self) -> AbstractConnection:
        """The live connection, opened when needed. Caller holds the setup lock."""
        if self._connection is None or self._connection.is_closed:
            self._connection = None
            self._channel = None
            self._exchanges.clear()
            self._connection = await aio_pika.connect(
                self._url, timeout=self.timeout, connection_class=_Connection
            )
        return self._connection

    def _lock(self) -> asyncio.Lock:
        if self._setup_lock is None:
            self._setup_lock = asyncio.Lock()
        return self._setup_lock

    async def _publisher(self) -> AbstractChannel:
        async with self._lock():
            if self._channel is None or self._channel.is_closed:
                connection = await self._connect()
                self._exchanges.clear()
                self._channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            return self._channel

    async def _exchange(self, channel: AbstractChannel, topic: str) -> AbstractExchange:
        exchange = self._exchanges.get(topic)
        if exchange is None:
            exchange = await channel.declare_exchange(
                topic, aio_pika.ExchangeType.TOPIC, durable=True
            )
            self._exchanges[topic] = exchange
        return exchange

    async def _publish(self, messages: list[Message]) -> list[BaseException | None]:
        results: list[BaseException | None] = [None] * len(messages)
        chains: dict[str, list[int]] = {}
        for i, m in enumerate(messages):
            chains.setdefault(m.key, []).append(i)

        async def publish_key(indexes: list[int], exchanges: dict[str, AbstractExchange]) -> None:
            # One key's messages go one at a time, each after the previous one's confirm, so
            # none leaves after a refused one; different keys are in flight together.
            for position, i in enumerate(indexes):
                m = messages[i]
                if results[i] is None:
                    try:
                        await exchanges[m.topic].publish(
                            _to_amqp(m),
                            routing_key=m.headers.get("event_type", ""),
                            mandatory=True,
                        )
                        continue
                    except DeliveryError as exc:  # returned (unroutable) or negatively confirmed
                        results[i] = _publish_failure(exc, m)
                event = m.headers.get("event_id", "?")
                for later in indexes[position + 1 :]:
                    results[later] = PublishFailed(
                        f"not sent: event {event} of the same key failed before it"
                    )
                return

        async def send() -> list[BaseException | None]:
            exchanges = await self._declare_topics(messages, results)
            return await asyncio.gather(
                *(publish_key(indexes, exchanges) for indexes in chains.values()),
                return_exceptions=True,
            )

        try:
            outcomes = await asyncio.wait_for(send(), self.timeout)
        except _LINK_ERRORS as exc:
            raise self._unavailable(exc) from exc
        for outcome in outcomes:
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
        for outcome in outcomes:
            if outcome is not None:
                # Anything but a refusal means the channel or connection broke mid-batch: what
                # became of the messages in flight is unknown.
                raise self._unavailable(outcome) from outcome
        return results

    async def _declare_topics(
        self, messages: list[Message], results: list[BaseException | None]
    ) -> dict[str, AbstractExchange]:
        """Each topic's exchange, declared on the current publisher channel; a topic that
        cannot be declared (e.g. it exists with another type) fails its messages."""
        refused: set[str] = set()
        while True:
            channel = await self._publisher()
            exchanges: dict[str, AbstractExchange] = {}
            try:
                for topic in dict.fromkeys(m.topic for m in messages):
                    if topic not in refused:
                        exchanges[topic] = await self._exchange(channel, topic)
            except AMQPChannelError as exc:
                # The refusal closed the channel: mark the topic, declare the rest on a new one.
                refused.add(topic)
                self._channel = None
                for i, m in enumerate(messages):
                    if m.topic == topic:
                        results[i] = PublishFailed(f"cannot declare exchange {topic!r}: {exc}")
                continue
            return exchanges

    async def _shutdown(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            try:
                await asyncio.wait_for(connection.close(), self.timeout)
            except (asyncio.TimeoutError, OSError) as exc:
                logger.debug("closing RabbitMQ connection failed: %s", exc)
        if self._background:
            await asyncio.wait(self._background, timeout=self.timeout)


class _Connection(aio_pika.Connection):
    """aio-pika's connection, minus closing itself on whatever loop runs where it is collected.

    A connection that failed half-way can be collected on the caller's thread (an exception
    traceback kept it alive); aio-pika would then create its ``close()`` coroutine there, on
    a loop that is not its own (or on none, under trio). Only its own loop may close it.
    """

    def __del__(self) -> None:
        try:
            own = self.loop
            running = asyncio.get_running_loop()
        except (AttributeError, RuntimeError):
            return
        if running is own:
            super().__del__()


def _forget(tasks: set[asyncio.Task[Any]]) -> Any:
    def discard(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("background task failed: %s", task.exception())

    return discard


def _publish_failure(exc: BaseException, message: Message) -> PublishFailed:
    event = message.headers.get("event_id", "?")
    if isinstance(exc, PublishError):
        return PublishFailed(
            f"event {event} is unroutable: no queue is bound to exchange {message.topic!r} "
            f"for routing key {message.headers.get('event_type', '')!r}"
        )
    if isinstance(exc, DeliveryError):
        return PublishFailed(f"RabbitMQ refused event {event} (negative confirm)")
    return PublishFailed(f"publishing event {event} failed: {type(exc).__name__}: {exc}")


def _to_amqp(message: Message) -> aio_pika.Message:
    headers: dict[str, Any] = dict(message.headers)
    headers[KEY_HEADER] = message.key
    return aio_pika.Message(
        message.value,
        headers=headers,
        content_type=message.headers.get("content-type", "application/json"),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.headers.get("event_id"),
        type=message.headers.get("event_type"),
    )


def _from_amqp(incoming: AbstractIncomingMessage) -> Message:
    headers = _text_headers(incoming.headers)
    key = headers.pop(KEY_HEADER, "")
    return Message(incoming.exchange or "", key, incoming.body, headers)


def _text_headers(raw: Mapping[str, Any]) -> dict[str, str]:
    """String headers only: RabbitMQ's own (``x-death``: a list of tables) are left out."""
    out: dict[str, str] = {}
    for name, value in raw.items():
        if isinstance(value, str):
            out[name] = value
        elif isinstance(value, (bytes, bytearray)):
            out[name] = bytes(value).decode("utf-8", "replace")
    return out


class RabbitMQConsumer:
    """A member of a RabbitMQ consumer group: one channel consuming the group's queue.

    Closing the channel (or losing the connection) makes RabbitMQ deliver everything it had
    not been acknowledged again.
    """

    def __init__(
        self, broker: RabbitMQBroker, topics: tuple[str, ...], group: str, name: str
    ) -> None:
        self._broker = broker
        self.topics = topics
        self.group = group
        self.name = name
        self._closed = False
        # Touched only on the private loop:
        self._channel: AbstractChannel | None = None
        self._buffer: collections.deque[AbstractIncomingMessage] = collections.deque()
        self._arrived: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"RabbitMQConsumer(group={self.group!r}, name={self.name!r})"

    async def __aenter__(self) -> RabbitMQConsumer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def receive(self, max_messages: int = 100, max_wait: float = 1.0) -> list[Delivery]:
        """Up to ``max_messages`` messages from the group's queue, in queue order."""
        if self._closed:
            raise BrokerError(f"{self!r} is closed")
        return await self._broker._loop.run(
            lambda: self._receive(max_messages, max_wait), on_orphan=self._give_back
        )

    async def ack(self, delivery: Delivery) -> None:
        """Acknowledge; RabbitMQ drops the message from the queue."""
        await self._settle(delivery, "ack")

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        """Requeue it, or publish a copy to ``<group>.dlq`` (with ``reason``) and acknowledge."""
        if requeue:
            await self._settle(delivery, "requeue")
            return
        copy = dead_letter_copy(delivery.message, self.group, reason)
        (result,) = await self._broker.publish([copy])
        # Without a stored copy, let RabbitMQ dead-letter it itself (the queue's DLX): the
        # message is kept, only the reason header is missing.
        await self._settle(delivery, "ack" if result is None else "dead-letter")

    async def aclose(self) -> None:
        """Close the channel; unacknowledged messages are delivered again."""
        if self._closed:
            return
        self._closed = True
        if not self._broker._closed:
            with anyio.CancelScope(shield=True):
                await self._broker._loop.run(self._close)

    # -- private loop ------------------------------------------------------------------------

    async def _start(self) -> None:
        broker = self._broker
        try:
            await asyncio.wait_for(self._declare_and_consume(), broker.timeout)
        except _LINK_ERRORS as exc:
            await self._close()
            raise broker._unavailable(exc) from exc
        except AMQPChannelError as exc:
            await self._close()
            raise BrokerError(
                f"cannot set up consumer group {self.group!r} on RabbitMQ: {exc}"
            ) from exc

    async def _declare_and_consume(self) -> None:
        broker = self._broker
        async with broker._lock():
            connection = await broker._connect()
        channel = self._channel = await connection.channel()
        await channel.set_qos(prefetch_count=broker.prefetch)
        dlq_name = dead_letter_topic(self.group)
        dlx = await channel.declare_exchange(dlq_name, aio_pika.ExchangeType.TOPIC, durable=True)
        # Declared like any group's queue, so that reading it as group "<group>.dlq" works.
        dlq = await _declare_group_queue(channel, dlq_name)
        await dlq.bind(dlx, "#")
        queue = await _declare_group_queue(channel, self.group)
        for topic in self.topics:
            exchange = await channel.declare_exchange(
                topic, aio_pika.ExchangeType.TOPIC, durable=True
            )
            await queue.bind(exchange, "#")
        self._arrived = asyncio.Event()
        channel.close_callbacks.add(self._on_close)
        await queue.consume(self._on_message, consumer_tag=self.name)

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        self._buffer.append(incoming)
        if self._arrived is not None:
            self._arrived.set()

    def _on_close(self, *_: object) -> None:
        if self._arrived is not None:
            self._arrived.set()

    async def _receive(self, max_messages: int, max_wait: float) -> list[Delivery]:
        if not self._buffer:
            self._check_channel()
            assert self._arrived is not None
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), max_wait)
            except asyncio.TimeoutError:
                return []
            if not self._buffer:
                self._check_channel()
                return []
        out: list[Delivery] = []
        while self._buffer and len(out) < max_messages:
            incoming = self._buffer.popleft()
            attempt = 2 if incoming.redelivered else 1
            out.append(Delivery(_from_amqp(incoming), attempt, incoming))
        return out

    def _check_channel(self) -> None:
        if self._channel is None or self._channel.is_closed:
            raise BrokerUnavailable(
                f"{self!r}: the channel to RabbitMQ at {self._broker._redacted} was closed"
            )

    def _give_back(self, deliveries: list[Delivery]) -> None:
        """A receive whose caller was cancelled: requeue what it took."""

        def requeue() -> None:
            for delivery in deliveries:
                incoming = delivery.token
                assert isinstance(incoming, AbstractIncomingMessage)
                self._broker._spawn(incoming.nack(requeue=True))

        self._broker._loop.call_soon(requeue)

    async def _settle(self, delivery: Delivery, how: str) -> None:
        incoming = delivery.token
        if not isinstance(incoming, AbstractIncomingMessage):
            raise TypeError(f"{delivery!r} was not received by a RabbitMQ consumer")

        async def settle() -> None:
            if how == "ack":
                operation = incoming.ack()
            elif how == "requeue":
                operation = incoming.nack(requeue=True)
            else:
                operation = incoming.reject(requeue=False)
            try:
                await asyncio.wait_for(operation, self._broker.timeout)
            except _LINK_ERRORS as exc:
                # The channel is gone, and with it the delivery: RabbitMQ delivers it again.
                raise BrokerUnavailable(
                    f"could not {how} on RabbitMQ at {self._broker._redacted}: {exc}"
                ) from exc

        await self._broker._loop.run(settle)

    async def _close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            try:
                await asyncio.wait_for(channel.close(), self._broker.timeout)
            except (asyncio.TimeoutError, OSError, AMQPChannelError) as exc:
                logger.debug("closing consumer channel failed: %s", exc)
        self._buffer.clear()  # unacknowledged on a closed channel: RabbitMQ has them back


async def _declare_group_queue(channel: AbstractChannel, group: str) -> AbstractQueue:
    """A group's durable queue; what RabbitMQ itself rejects goes to ``<group>.dlq``."""
    return await channel.declare_queue(
        group, durable=True, arguments={"x-dead-letter-exchange": dead_letter_topic(group)}
    )


def _from_url(url: str) -> RabbitMQBroker:
    """``amqp://user:pass@host:port/vhost?timeout=5&prefetch=100``; other options go to aio-pika."""
    parsed = parse_url(url, default_port=5672, schemes=("amqp", "amqps"))
    if len(parsed.hosts) > 1:
        raise ValueError(f"amqp:// takes one host, got {parsed.redacted!r}")
    timeout = parsed.pop_float("timeout", 5.0)
    prefetch = parsed.pop_int("prefetch", 100, minimum=1)
    assert prefetch is not None
    parts = urlsplit(url)
    rest = urlencode(parsed.options)
    return RabbitMQBroker(parts._replace(query=rest).geturl(), timeout=timeout, prefetch=prefetch)
