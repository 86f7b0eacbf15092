"""Kafka specifics: what an acknowledgement means, and keys pinned to partitions."""

from __future__ import annotations

from typing import Any, cast

import pytest

from saga_brokers.kafka import KafkaBroker
from tests.brokers.conftest import KAFKA_OPTIONS, Names
from tests.brokers.helpers import message, open_broker, open_consumer, receive_n

pytestmark = pytest.mark.anyio


async def test_acks_mean_stored_and_a_key_stays_on_one_partition(tansu: str, names: Names) -> None:
    topic, group = names.topic(), names.group()
    batch = [message(topic, f"order-{i % 5}", i) for i in range(40)]
    async with open_broker(f"kafka://{tansu}?{KAFKA_OPTIONS}") as broker:
        assert isinstance(broker, KafkaBroker)
        async with open_consumer(broker, [topic], group) as consumer:
            assert list(await broker.publish(batch)) == [None] * len(batch)
            config = broker._producer.config
            assert config["acks"] == -1  # "all": every in-sync replica has it
            assert config["enable_idempotence"] is True
            got = await receive_n(consumer, len(batch))
    partitions: dict[str, set[int]] = {}
    for d in got:
        tp, _offset = cast(tuple[Any, int], d.token)
        partitions.setdefault(d.message.key, set()).add(tp.partition)
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1  # the topic has several
