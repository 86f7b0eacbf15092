"""Building messages and draining consumers in broker tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import anyio

from saga_brokers import create_broker
from saga_core.consumer import BrokerConsumer, ConsumingBroker, Delivery
from saga_core.errors import BrokerUnavailable
from saga_core.events import Message, OutboxEvent

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def message(topic: str, key: str, n: int, **headers: str) -> Message:
    """The message the relay would publish for event number ``n`` of aggregate ``key``."""
    event = OutboxEvent(
        aggregate_type="order",
        aggregate_id=key,
        event_type=f"order_step_{n % 3}",
        payload={"n": n, "key": key, "text": "grüße"},
        topic=topic,
        headers=headers,
        saga_id=f"saga-{uuid.uuid4().hex[:6]}",
    )
    return Message(
        topic, event.key, event.payload_json().encode(), event.message_headers(TRACEPARENT)
    )


@asynccontextmanager
async def open_broker(url: str) -> AsyncIterator[ConsumingBroker]:
    """``create_broker(url)``, closed on exit (shielded, so a failing test still cleans up)."""
    broker = create_broker(url)
    assert isinstance(broker, ConsumingBroker)
    try:
        yield broker
    finally:
        with anyio.CancelScope(shield=True):
            await broker.aclose()


@asynccontextmanager
async def open_consumer(
    broker: ConsumingBroker, topics: Sequence[str], group: str, name: str | None = None
) -> AsyncIterator[BrokerConsumer]:
    """A consumer closed on exit."""
    consumer = await broker.consumer(topics, group, name=name)
    try:
        yield consumer
    finally:
        with anyio.CancelScope(shield=True):
            await consumer.aclose()


async def receive_n(consumer: BrokerConsumer, n: int, within: float = 15.0) -> list[Delivery]:
    """Receive until ``n`` messages arrived (fails after ``within`` seconds)."""
    got: list[Delivery] = []
    with anyio.fail_after(within):
        while len(got) < n:
            got.extend(await consumer.receive(n - len(got), 0.5))
    return got


async def receive_until(
    consumer: BrokerConsumer, event_id: str, within: float = 15.0
) -> list[Delivery]:
    """Receive until the message with ``event_id`` arrived; return everything received."""
    got: list[Delivery] = []
    with anyio.fail_after(within):
        while not any(d.message.event_id == event_id for d in got):
            got.extend(await consumer.receive(100, 0.5))
    return got


async def publish_until_accepted(
    broker: ConsumingBroker, batch: Sequence[Message], within: float = 20.0
) -> Sequence[BaseException | None]:
    """Publish, retrying while the broker is (still) unavailable."""
    with anyio.fail_after(within):
        while True:
            try:
                return await broker.publish(batch)
            except BrokerUnavailable:
                await anyio.sleep(0.2)


async def wait_for(predicate: Callable[[], bool], within: float = 20.0) -> None:
    """Poll ``predicate`` until it holds."""
    with anyio.fail_after(within):
        while not predicate():
            await anyio.sleep(0.02)


Handler = Callable[[Message], Awaitable[None]]
