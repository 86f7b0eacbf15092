"""The consumer side of a broker, and a runner that hands each message to a handler.

Adapters (``saga_brokers``) implement :class:`ConsumingBroker` and :class:`BrokerConsumer`;
:class:`ConsumerRunner` is written once against those protocols. Delivery is at least once: a
message is acknowledged only after its handler returned, so a crash in between delivers it again
(an ``Inbox`` inside the handler's transaction turns that into exactly-once effects).

Pure: depends on anyio and other ``saga_core`` modules only.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, Protocol, runtime_checkable

import anyio
from anyio.abc import TaskStatus

from saga_core.errors import BrokerError, BrokerUnavailable, ErrorRecord
from saga_core.events import Message
from saga_core.ports import Broker
from saga_core.retry import RetryPolicy

__all__ = [
    "DEAD_LETTER_REASON",
    "DEAD_LETTER_TOPIC",
    "DEFAULT_CONSUMER_RETRY",
    "BrokerConsumer",
    "ConsumerRunner",
    "ConsumingBroker",
    "Delivery",
    "Handler",
    "dead_letter_topic",
    "default_consumer_name",
]

logger = logging.getLogger(__name__)

#: Header a dead-lettered copy carries: why the handler gave up on it.
DEAD_LETTER_REASON = "dead_letter_reason"
#: Header a dead-lettered copy carries: the topic it was first published to.
DEAD_LETTER_TOPIC = "dead_letter_topic"

#: Handler failures are retried in place five times (0.5 s, 1 s, 2 s, 4 s between tries),
#: then the message is dead-lettered.
DEFAULT_CONSUMER_RETRY = RetryPolicy(max_attempts=5, backoff=0.5, max_backoff=30.0)

#: Reconnecting after the broker went away: unbounded, capped at 10 s between tries.
_RECONNECT = RetryPolicy(max_attempts=None, backoff=0.2, max_backoff=10.0)

#: A handler: receives one message and returns when its effects are durable.
Handler = Callable[[Message], Awaitable[None]]


def dead_letter_topic(group: str) -> str:
    """Where a consumer group's dead letters go, on every broker: ``"<group>.dlq"``.

    Read them back with ``broker.consumer([dead_letter_topic(g)], group=dead_letter_topic(g))``.
    """
    return f"{group}.dlq"


def default_consumer_name() -> str:
    """A consumer name unique to this process: ``host-pid-random``."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, eq=False)
class Delivery:
    """One received message, to be acknowledged or rejected through the consumer that got it.

    Attributes:
        message: topic, key, value and headers, as published.
        attempt: how many times the broker has delivered this message, this time included, as
            far as it can tell (1 when it cannot: Kafka keeps no count, RabbitMQ classic queues
            only say "redelivered", which counts as 2).
        token: the adapter's handle for acknowledging it; opaque to everyone else.
    """

    message: Message
    attempt: int = 1
    token: object = field(default=None, repr=False)


@runtime_checkable
class BrokerConsumer(Protocol):
    """A member of a consumer group, subscribed to some topics.

    Messages it received and did not acknowledge are delivered again (to it or to another member
    of the group) after it is closed or dies. Methods raise ``BrokerUnavailable`` when the
    broker cannot be reached; the consumer should then be closed and a new one made.
    """

    async def receive(self, max_messages: int = 100, max_wait: float = 1.0) -> Sequence[Delivery]:
        """Wait up to ``max_wait`` seconds for messages; return up to ``max_messages`` (maybe none).

        Within one topic and key, messages come in publish order.
        """
        ...

    async def ack(self, delivery: Delivery) -> None:
        """The message was handled: never deliver it to this group again.

        On Kafka an acknowledgement is cumulative per partition: acknowledge in receive order.
        """
        ...

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        """Give the message up. ``requeue=True``: deliver it again later (messages after it on
        the same partition come again too on Kafka); ``requeue=False``: move it to the group's
        dead-letter topic (:func:`dead_letter_topic`) with ``reason`` in a header."""
        ...

    async def aclose(self) -> None:
        """Leave the group. What was received and not acknowledged is delivered again."""
        ...


@runtime_checkable
class ConsumingBroker(Broker, Protocol):
    """A broker that can also consume."""

    async def consumer(
        self, topics: Sequence[str], group: str, *, name: str | None = None
    ) -> BrokerConsumer:
        """Join consumer group ``group`` on ``topics``, creating what the broker needs (queues,
        bindings, stream groups). A new group starts at the oldest retained message.

        ``name`` identifies this member within the group (default: host, pid and a random part).
        """
        ...


class ConsumerRunner:
    """Consumes ``topics`` as member ``name`` of ``group``, one message at a time, in order.

    Each message goes to ``handler``; it is acknowledged only after the handler returned. A
    handler that raises is retried in place (the message stays unacknowledged, so a crash still
    gets it delivered again, and later messages of the same key wait behind it) under ``retry``;
    when the policy gives up, or the broker has already delivered the message more than
    ``retry.max_attempts`` times (it keeps crashing its consumers), it is dead-lettered to
    ``dead_letter_topic(group)`` and the runner moves on. When the broker goes away the runner
    reconnects with backoff; unacknowledged messages are delivered again.

    For parallelism run several runners (each is one member of the group).

    Example::

        async def handle(message: Message) -> None: ...

        runner = ConsumerRunner(broker, ["order"], "billing", handle)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)   # returns once subscribed
    """

    def __init__(
        self,
        broker: ConsumingBroker,
        topics: Sequence[str],
        group: str,
        handler: Handler,
        *,
        retry: RetryPolicy = DEFAULT_CONSUMER_RETRY,
        name: str | None = None,
        batch_size: int = 100,
        poll_timeout: float = 1.0,
    ) -> None:
        if isinstance(topics, str):
            raise TypeError("topics must be a sequence of topic names, not a str")
        if not topics:
            raise ValueError("ConsumerRunner needs at least one topic")
        if batch_size < 1 or poll_timeout <= 0:
            raise ValueError("batch_size must be >= 1 and poll_timeout > 0")
        self.broker = broker
        self.topics = tuple(topics)
        self.group = group
        self.handler = handler
        self.retry = retry
        self.name = name or default_consumer_name()
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        #: Messages handled and acknowledged so far.
        self.handled = 0
        #: Messages moved to the dead-letter topic so far.
        self.dead_lettered = 0
        self._outages = 0

    def __repr__(self) -> str:
        return (
            f"ConsumerRunner(group={self.group!r}, topics={list(self.topics)!r}, "
            f"name={self.name!r})"
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until cancelled. With ``TaskGroup.start`` it returns once subscribed."""
        started = False
        self._outages = 0
        while True:
            try:
                consumer = await self.broker.consumer(self.topics, self.group, name=self.name)
            except BrokerUnavailable as exc:
                self._outages += 1
                await self._pause("joining", exc)
                continue
            if not started:
                task_status.started()
                started = True
            try:
                await self._consume(consumer)
            except BrokerError as exc:
                # Unavailable, or a dead letter that could not be stored: start over from what
                # the broker still holds unacknowledged.
                self._outages += 1
                error = exc
            finally:
                # Closing gives back whatever was received and not acknowledged.
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    try:
                        await consumer.aclose()
                    except BrokerError as exc:
                        logger.debug("closing consumer %s failed: %s", self.name, exc)
            await self._pause("consuming", error)

    async def _pause(self, doing: str, exc: BrokerError) -> None:
        delay = _RECONNECT.delay(self._outages)
        logger.warning(
            "consumer %s of group %r: broker error while %s (%s); retrying in %.1fs",
            self.name,
            self.group,
            doing,
            exc,
            delay,
        )
        await anyio.sleep(delay)

    async def _consume(self, consumer: BrokerConsumer) -> NoReturn:
        while True:
            deliveries = await consumer.receive(self.batch_size, self.poll_timeout)
            self._outages = 0  # the backoff grows only while the broker keeps failing
            for delivery in deliveries:
                await self._handle(consumer, delivery)

    async def _handle(self, consumer: BrokerConsumer, delivery: Delivery) -> None:
        message = delivery.message
        limit = self.retry.max_attempts
        attempt = max(1, delivery.attempt)
        if limit is not None and attempt > limit:
            await self._dead_letter(
                consumer, delivery, f"delivered {attempt} times without being acknowledged"
            )
            return
        while True:
            try:
                await self.handler(message)
            except Exception as exc:
                if self.retry.should_retry(attempt, exc):
                    delay = self.retry.delay(attempt)
                    logger.warning(
                        "handler failed on event %s (%s, attempt %d): %s; retrying in %.2fs",
                        message.headers.get("event_id"),
                        message.topic,
                        attempt,
                        exc,
                        delay,
                    )
                    await anyio.sleep(delay)
                    attempt += 1
                    continue
                await self._dead_letter(consumer, delivery, str(ErrorRecord.from_exception(exc)))
                return
            break
        try:
            await consumer.ack(delivery)
        except BrokerUnavailable:
            raise
        except BrokerError as exc:
            # E.g. a Kafka rebalance took the partition away: the new owner delivers it again.
            logger.warning(
                "could not acknowledge event %s: %s", message.headers.get("event_id"), exc
            )
            return
        self.handled += 1

    async def _dead_letter(self, consumer: BrokerConsumer, delivery: Delivery, reason: str) -> None:
        message = delivery.message
        logger.error(
            "dead-lettering event %s (%s, key %r) to %s: %s",
            message.headers.get("event_id"),
            message.topic,
            message.key,
            dead_letter_topic(self.group),
            reason,
        )
        await consumer.reject(delivery, requeue=False, reason=reason)
        self.dead_lettered += 1
