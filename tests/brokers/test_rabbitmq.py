"""RabbitMQ specifics: the AMQP message, and a topic whose exchange cannot be declared."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.brokers.conftest import RABBIT, Names, _delete_rabbit_objects, _run_async
from tests.brokers.helpers import message, open_broker, open_consumer, receive_n
from tests.support.services import require_server

pytestmark = pytest.mark.anyio

URL = "amqp://guest:guest@127.0.0.1:5672/?timeout=3"


@pytest.fixture
def rabbit(names: Names) -> Iterator[None]:
    require_server(*RABBIT, "RabbitMQ")
    try:
        yield
    finally:
        _delete_rabbit_objects(names)


def _declare_fanout(name: str) -> None:
    import aio_pika

    async def declare() -> None:
        connection = await aio_pika.connect(URL.split("?")[0], timeout=5)
        async with connection:
            channel = await connection.channel()
            await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)

    _run_async(declare)


async def test_amqp_properties_and_a_topic_that_cannot_be_declared(
    rabbit: None, names: Names
) -> None:
    good, clash, group = names.topic(), names.topic("fanout"), names.group()
    _declare_fanout(clash)  # our topic exchanges are "topic" exchanges: declaring it fails
    batch = [message(good, "k1", 1), message(clash, "k2", 2), message(good, "k3", 3)]
    async with open_broker(URL) as broker, open_consumer(broker, [good], group) as consumer:
        results = list(await broker.publish(batch))
        assert results[0] is None and results[2] is None
        assert "cannot declare exchange" in str(results[1])
        got = await receive_n(consumer, 2)
        assert [d.message for d in got] == [batch[0], batch[2]]  # the key header is removed
        incoming: Any = got[0].token
        assert incoming.message_id == batch[0].event_id
        assert incoming.type == batch[0].headers["event_type"]
        assert incoming.routing_key == batch[0].headers["event_type"]
        assert incoming.delivery_mode == 2  # persistent
        assert incoming.headers["message_key"] == "k1"
        for d in got:
            await consumer.ack(d)
