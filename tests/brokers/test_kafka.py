"""Kafka specifics: what an acknowledgement means, and keys pinned to partitions."""

from __future__ import annotations

from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saga_brokers import kafka as adapter
from saga_brokers._kafka_partitions import KeyPartitioner, known_partitions
from saga_brokers.kafka import KafkaBroker
from saga_core.consumer import Delivery
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


def _partitions_by_key(got: list[Delivery]) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for d in got:
        tp, _offset = cast(tuple[Any, int], d.token)
        found.setdefault(d.message.key, set()).add(tp.partition)
    return found


async def test_each_key_goes_where_kafka_pythons_default_partitioner_puts_it(
    tansu: str, names: Names
) -> None:
    """The adapter picks a keyed message's partition itself once the producer knows the
    topic (saga_brokers._kafka_partitions): it must be the partition kafka-python's own
    default partitioner picks, which other producers of the key agree with."""
    topic, group = names.topic(), names.group()
    keys = [f"order-{i}" for i in range(40)]
    async with open_broker(f"kafka://{tansu}?{KAFKA_OPTIONS}") as broker:
        assert isinstance(broker, KafkaBroker)
        async with open_consumer(broker, [topic], group) as consumer:
            # The first batch meets an unknown topic: kafka-python partitions it. The adapter
            # partitions the second one (it knows the topic's partitions by then).
            assert list(await broker.publish([message(topic, k, 0) for k in keys])) == [None] * 40
            partitions = known_partitions(broker._producer, topic, adapter.DefaultPartitioner)
            assert len(partitions) > 1
            assert list(await broker.publish([message(topic, k, 1) for k in keys])) == [None] * 40
            got = await receive_n(consumer, 2 * len(keys))
    # kafka-python, imported by the adapter (its import warns on this Python; the adapter
    # imports it with that warning silenced).
    plain = adapter.KafkaProducer(bootstrap_servers=[tansu], acks="all")
    try:  # where kafka-python's default partitioner puts each key: its acknowledgement says
        expected = {
            k: plain.send(topic, key=k.encode(), value=b"x").get(10).partition for k in keys
        }
    finally:
        plain.close(timeout=5)
    assert _partitions_by_key(got) == {k: {p} for k, p in expected.items()}
    assert len(set(expected.values())) > 1  # the keys do spread over several partitions


async def test_a_partitioner_of_the_users_own_still_decides(tansu: str, names: Names) -> None:
    from kafka.partitioner import Partitioner  # after the adapter imported kafka-python

    class _AllOnZero(Partitioner):  # type: ignore[misc]
        """A user's own partitioner: everything on partition 0."""

        def partition(self, *args: Any, **kwargs: Any) -> int:
            return 0

    topic, group = names.topic(), names.group()
    broker = KafkaBroker(
        [tansu],
        timeout=3,
        producer_config={"partitioner": _AllOnZero()},
        consumer_config={"session_timeout_ms": 2000, "heartbeat_interval_ms": 300},
    )
    try:
        async with open_consumer(broker, [topic], group) as consumer:
            for n in range(2):  # the second batch too, when the topic's partitions are known
                batch = [message(topic, f"order-{i}", n) for i in range(20)]
                assert list(await broker.publish(batch)) == [None] * 20
            got = await receive_n(consumer, 40)
    finally:
        await broker.aclose()
    assert {p for ps in _partitions_by_key(got).values() for p in ps} == {0}


class _Cluster:
    """What DefaultPartitioner reads of kafka-python's cluster metadata, for one topic."""

    def __init__(self, topic: str, partitions: set[int]) -> None:
        self._topic, self._partitions = topic, partitions

    def topics(self) -> set[str]:
        return {self._topic}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self._partitions


@given(
    keys=st.lists(st.binary(max_size=12), max_size=30),
    partitions=st.sets(st.integers(0, 40), min_size=1, max_size=8),
    max_keys=st.integers(1, 5),
)
def test_key_partitioner_chooses_as_the_default_partitioner_however_few_hashes_it_keeps(
    keys: list[bytes], partitions: set[int], max_keys: int
) -> None:
    chooser = KeyPartitioner(adapter.murmur2, max_keys=max_keys)
    default, cluster = adapter.DefaultPartitioner(), _Cluster("t", partitions)
    layout = tuple(sorted(partitions))
    for key in keys + keys:  # every key twice: hashed, then perhaps remembered
        assert chooser.partition(layout, key) == default.partition("t", key, key, b"", b"", cluster)
        assert len(chooser._hashes) <= max_keys
