"""Kafka specifics: what an acknowledgement means, and keys pinned to partitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saga_brokers import kafka as adapter
from saga_brokers._kafka_partitions import KeyPartitioner, known_partitions
from saga_brokers.kafka import KafkaBroker
from saga_core import Message, PublishFailed
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


async def _publish_all(broker: KafkaBroker, topic: str, keys: list[str], n: int) -> None:
    """Publish event ``n`` of every key; each must be acknowledged."""
    assert list(await broker.publish([message(topic, k, n) for k in keys])) == [None] * len(keys)


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
            await _publish_all(broker, topic, keys, 0)
            partitions = known_partitions(broker._producer, topic, adapter.DefaultPartitioner)
            assert len(partitions) > 1
            chosen = _spy_on_send(broker)
            await _publish_all(broker, topic, keys, 1)
            assert len(chosen) == len(keys) and None not in chosen  # the adapter chose them
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


def _spy_on_send(broker: KafkaBroker) -> list[int | None]:
    """The ``partition`` argument of every later ``send`` of the broker's producer."""
    producer = broker._producer
    real, chosen = producer.send, []

    def send(*args: Any, partition: int | None = None, **kwargs: Any) -> Any:
        chosen.append(partition)
        return real(*args, partition=partition, **kwargs)

    producer.send = send
    return chosen


async def test_a_partition_the_producer_no_longer_knows_is_left_to_send(
    tansu: str, names: Names
) -> None:
    """Each batch reads a topic's partitions once; should they shrink meanwhile (a topic
    recreated with fewer), ``send`` refuses the chosen partition, and the adapter must let
    ``send`` choose rather than report the message refused. Stale metadata is injected as a
    batch's layout claiming partitions the topic does not have."""
    topic, group = names.topic(), names.group()
    keys = [f"order-{i}" for i in range(40)]
    async with open_broker(f"kafka://{tansu}?{KAFKA_OPTIONS}") as broker:
        assert isinstance(broker, KafkaBroker)
        async with open_consumer(broker, [topic], group) as consumer:
            await _publish_all(broker, topic, keys, 0)
            producer = broker._producer
            real = known_partitions(producer, topic, adapter.DefaultPartitioner)
            stale = {topic: tuple(range(len(real) * 10))}  # mostly partitions it lacks
            futures = [broker._send(producer, message(topic, k, 1), stale) for k in keys]
            producer.flush(timeout=10)
            assert stale[topic] == real  # read again once send refused a partition
            assert all(f.get(0).partition in real for f in futures)
            got = await receive_n(consumer, 2 * len(keys))
    # Each key stayed where the first batch (partitioned by send itself) put it: a stale pick
    # inside the real range is the real pick too (10n partitions: h % 10n < n means h % n),
    # and every other one was chosen again from the real partitions.
    assert all(len(ps) == 1 for ps in _partitions_by_key(got).values())


async def test_a_message_send_refuses_for_itself_is_not_sent_again(
    tansu: str, names: Names
) -> None:
    """Only a partition the producer no longer knows makes the adapter choose again: a
    ``ValueError`` about the message itself (kafka-python cannot encode a header key that is
    not UTF-8) refuses it after one ``send``, and the rest of the batch goes out."""
    topic = names.topic()
    good = [message(topic, f"order-{i}", 0) for i in range(3)]
    bad = Message(topic, "order-1", b"{}", {**good[1].headers, "x-\udc80": "v"})
    async with open_broker(f"kafka://{tansu}?{KAFKA_OPTIONS}") as broker:
        assert isinstance(broker, KafkaBroker)
        assert list(await broker.publish(good)) == [None] * 3  # the topic's partitions known
        sent = _spy_on_send(broker)
        outcomes = list(await broker.publish([good[0], bad, good[2]]))
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PublishFailed)
    assert len(sent) == 3 and None not in sent  # one send each, all partitioned by us


async def test_a_key_that_is_not_utf8_refuses_only_its_own_message(
    tansu: str, names: Names
) -> None:
    """A message key with a lone surrogate cannot be sent (``OutboxEvent`` refuses one, but an
    adapter takes any ``Message``): that message is refused, the rest of the batch is sent."""
    topic = names.topic()
    good = [message(topic, f"order-{i}", 0) for i in range(3)]
    bad = Message(topic, "\ud800", b"{}", dict(good[0].headers))
    async with open_broker(f"kafka://{tansu}?{KAFKA_OPTIONS}") as broker:
        for _ in range(2):  # the first batch partitioned by send, the second by the adapter
            outcomes = list(await broker.publish([good[0], bad, good[1], good[2]]))
            assert outcomes[0] is None and outcomes[2:] == [None, None]
            assert isinstance(outcomes[1], PublishFailed)


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

    def __init__(self, topic: str, partitions: Sequence[int]) -> None:
        self._topic, self._partitions = topic, partitions  # in any order, as a set iterates

    def topics(self) -> set[str]:
        return {self._topic}

    def partitions_for_topic(self, topic: str) -> Sequence[int]:
        return self._partitions

    def available_partitions_for_topic(self, topic: str) -> Sequence[int]:
        return self._partitions


class _Producer:
    """What ``known_partitions`` reads of a kafka-python producer."""

    def __init__(self, cluster: _Cluster | None, **config: Any) -> None:
        self.config = {"partitioner": adapter.DefaultPartitioner(), "key_serializer": None}
        self.config.update(config)
        if cluster is not None:
            self._metadata = cluster


def test_known_partitions_only_where_send_would_hash_the_same_key_the_same_way() -> None:
    cluster = _Cluster("t", [7, 0, 12, 3])

    class _Mine(adapter.DefaultPartitioner):  # type: ignore[misc]
        """A user's partitioner that happens to derive from the default one."""

    assert known_partitions(_Producer(cluster), "t", adapter.DefaultPartitioner) == (0, 3, 7, 12)
    # send hashes the serialized key, which the adapter does not compute
    serialized = _Producer(cluster, key_serializer=lambda k: b"x" + k)
    assert known_partitions(serialized, "t", adapter.DefaultPartitioner) == ()
    assert known_partitions(_Producer(cluster, partitioner=_Mine()), "t", _Mine.__base__) == ()
    assert known_partitions(_Producer(None), "t", adapter.DefaultPartitioner) == ()
    unknown = _Cluster("t", [])
    unknown.partitions_for_topic = lambda topic: None  # type: ignore[method-assign]
    assert known_partitions(_Producer(unknown), "t", adapter.DefaultPartitioner) == ()


@given(
    keys=st.lists(st.binary(max_size=12), max_size=30),
    partitions=st.lists(st.integers(0, 40), min_size=1, max_size=8, unique=True),
    max_keys=st.integers(1, 5),
)
def test_key_partitioner_chooses_as_the_default_partitioner_however_few_hashes_it_keeps(
    keys: list[bytes], partitions: list[int], max_keys: int
) -> None:
    chooser = KeyPartitioner(adapter.murmur2, max_keys=max_keys)
    default, cluster = adapter.DefaultPartitioner(), _Cluster("t", partitions)
    # The metadata's set, in whatever order it iterates, as the adapter reads it.
    layout = known_partitions(_Producer(cluster), "t", adapter.DefaultPartitioner)
    for key in keys + keys:  # every key twice: hashed, then perhaps remembered
        assert chooser.partition(layout, key) == default.partition("t", key, key, b"", b"", cluster)
        assert len(chooser._hashes) <= max_keys
