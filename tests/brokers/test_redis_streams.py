"""Redis Streams specifics: trimming never drops what a consumer group still needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from saga_core._json import dumps
from saga_core._stored_headers import StoredHeaders
from saga_core.events import Message
from tests.brokers.conftest import REDIS, Names, _delete_redis_keys
from tests.brokers.helpers import message, open_broker, open_consumer, receive_n
from tests.support.services import require_server

pytestmark = pytest.mark.anyio


def _id(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


@pytest.fixture
def client(names: Names) -> Iterator[redis.Redis]:
    require_server(*REDIS, "Redis")
    client = redis.Redis(host=REDIS[0], port=REDIS[1], socket_timeout=5)
    try:
        yield client
    finally:
        client.close()
        _delete_redis_keys(names)


async def test_maxlen_trims_only_what_every_group_has_finished(
    names: Names, client: redis.Redis
) -> None:
    topic, group = names.topic(), names.group()
    url = "redis://127.0.0.1:6379/0?maxlen=50&timeout=3"
    async with open_broker(url) as broker, open_consumer(broker, [topic], group) as consumer:
        for start in range(0, 300, 100):
            batch = [message(topic, "k", n) for n in range(start, start + 100)]
            assert list(await broker.publish(batch)) == [None] * 100
        assert client.xlen(topic) == 300  # the group has read nothing: all of it is kept

        got = await receive_n(consumer, 250)
        for d in got[:200]:
            await consumer.ack(d)
        await broker.publish([message(topic, "k", 300)])
        # Entries 0-199 are done (approximate trimming drops whole 100-entry nodes); 200-249
        # are pending and 250+ unread, so they stay.
        length = client.xlen(topic)
        assert 101 <= length <= 201
        first: Any = client.xrange(topic, count=1)
        assert _id(first[0][0]) <= _id(got[200].token[1])  # type: ignore[index]


async def test_without_groups_maxlen_is_plain_approximate_trimming(
    names: Names, client: redis.Redis
) -> None:
    topic = names.topic()
    async with open_broker("redis://127.0.0.1:6379/0?maxlen=50&timeout=3") as broker:
        for start in range(0, 300, 100):
            await broker.publish([message(topic, "k", n) for n in range(start, start + 100)])
    assert 50 <= client.xlen(topic) <= 150


async def test_entries_are_plain_fields(names: Names, client: redis.Redis) -> None:
    topic = names.topic()
    m = message(topic, "order-7", 1)
    async with open_broker("redis://127.0.0.1:6379/0?timeout=3") as broker:
        await broker.publish([m])
    entries: Any = client.xrange(topic)
    ((_, fields),) = entries
    assert fields[b"key"] == b"order-7"
    assert fields[b"value"] == m.value
    assert b'"event_id"' in fields[b"headers"]


async def test_headers_read_from_the_outbox_are_sent_as_stored(
    names: Names, client: redis.Redis
) -> None:
    """The relay's headers keep the JSON text they were stored as; Redis gets that text (not a
    re-encoding, and without parsing it), and a consumer reads back the same headers."""
    topic, group = names.topic(), names.group()
    m = message(topic, "order-8", 2, region="eu-west", note='quote " and ünïcode')
    stored = StoredHeaders(dumps(m.headers))
    relayed = Message(m.topic, m.key, m.value, stored)
    url = "redis://127.0.0.1:6379/0?timeout=3"
    async with open_broker(url) as broker, open_consumer(broker, [topic], group) as consumer:
        await broker.publish([relayed])
        assert stored._parsed is None  # sent without decoding the stored text
        (got,) = await receive_n(consumer, 1)
    assert stored == m.headers
    ((_, fields),) = client.xrange(topic)  # type: ignore[misc]
    assert fields[b"headers"] == stored.json.encode()
    assert dict(got.message.headers) == dict(m.headers)
