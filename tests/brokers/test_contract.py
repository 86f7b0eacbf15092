"""The broker contract, written once and run against every broker (and under asyncio and trio).

``case`` is each broker on its shared server; ``server`` is a broker whose server the test may
stop, restart or turn into a black hole (memory has none, so it is not among those params).
"""

from __future__ import annotations

import time
from collections import defaultdict

import anyio
import pytest

from saga_core.consumer import (
    DEAD_LETTER_REASON,
    DEAD_LETTER_TOPIC,
    ConsumerRunner,
    dead_letter_topic,
)
from saga_core.errors import BrokerUnavailable, PublishFailed
from saga_core.events import Message
from saga_core.retry import RetryPolicy
from tests.brokers.conftest import SERVER_KINDS, BrokerCase, ServerCase
from tests.brokers.helpers import (
    message,
    open_broker,
    open_consumer,
    publish_until_accepted,
    receive_n,
    receive_until,
    wait_for,
)

pytestmark = pytest.mark.anyio


def by_key(messages: list[Message]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for m in messages:
        out[m.key].append(m.event_id)
    return dict(out)


async def test_round_trip_keeps_shape_headers_and_per_key_order(case: BrokerCase) -> None:
    topic, group = case.names.topic(), case.names.group()
    batch = [message(topic, f"order-{i % 3}", i, tenant="acme") for i in range(30)]
    async with open_broker(case.url) as broker, open_consumer(broker, [topic], group) as consumer:
        results = await broker.publish(batch)
        assert list(results) == [None] * len(batch)  # the whole batch acknowledged

        got = await receive_n(consumer, len(batch))
        received = [d.message for d in got]
        assert sorted(received, key=lambda m: m.event_id) == sorted(
            batch, key=lambda m: m.event_id
        )  # topic, key, value and every header, as published
        first = received[0]
        assert {"event_id", "event_type", "saga_id", "traceparent", "content-type", "tenant"} <= (
            set(first.headers)
        )
        assert by_key(received) == by_key(batch)  # each key's events in publish order
        assert all(d.attempt == 1 for d in got)
        for d in got:
            await consumer.ack(d)
        assert await consumer.receive(10, 0.3) == []


async def test_relayed_headers_reach_consumers_as_a_plain_dict(case: BrokerCase) -> None:
    """A message the relay read back from the outbox (headers as ``StoredHeaders``, a read-only
    mapping over their stored JSON text) reaches consumers with the same headers as a plain
    ``dict``, on every broker: a handler may change or JSON-encode it."""
    from saga_core._json import dumps
    from saga_core._stored_headers import StoredHeaders

    topic, group = case.names.topic(), case.names.group()
    m = message(topic, "order-1", 1, tenant="acme")
    relayed = Message(m.topic, m.key, m.value, StoredHeaders(dumps(m.headers)))
    async with open_broker(case.url) as broker, open_consumer(broker, [topic], group) as consumer:
        assert list(await broker.publish([relayed])) == [None]
        (got,) = await receive_n(consumer, 1)
    assert type(got.message.headers) is dict
    assert got.message.headers == dict(m.headers)
    assert dumps(got.message.headers) == dumps(m.headers)


async def test_unacknowledged_messages_are_delivered_again_after_a_consumer_dies(
    case: BrokerCase,
) -> None:
    topic, group = case.names.topic(), case.names.group()
    batch = [message(topic, "order-1", i) for i in range(3)]
    async with open_broker(case.url) as broker:
        async with open_consumer(broker, [topic], group, name="first") as first:
            assert list(await broker.publish(batch)) == [None] * 3
            taken = await receive_n(first, 1)
        # ``first`` left without acknowledging anything it took.
        async with open_consumer(broker, [topic], group, name="second") as second:
            again = await receive_n(second, 3)
            expected = [m.event_id for m in batch]
            if case.ordered_takeover:
                assert [d.message.event_id for d in again] == expected
            else:
                assert sorted(d.message.event_id for d in again) == sorted(expected)
            if case.counts_redeliveries:
                taken_ids = {d.message.event_id for d in taken}
                assert all(d.attempt >= 2 for d in again if d.message.event_id in taken_ids)
            for d in again:
                await second.ack(d)
        marker = message(topic, "order-2", 99)
        assert list(await broker.publish([marker])) == [None]
        async with open_consumer(broker, [topic], group, name="third") as third:
            rest = await receive_until(third, marker.event_id)
            assert [d.message.event_id for d in rest] == [marker.event_id]  # acks held


async def test_runner_acks_after_the_handler_and_dead_letters_what_keeps_failing(
    case: BrokerCase,
) -> None:
    topic, group = case.names.topic(), case.names.group()
    batch = [message(topic, f"order-{i % 2}", i) for i in range(5)]
    poison, flaky = batch[2].event_id, batch[1].event_id
    calls: dict[str, list[str]] = defaultdict(list)  # per key (keys may sit on two partitions)

    async def handler(m: Message) -> None:
        calls[m.key].append(m.event_id)
        if m.event_id == poison or (m.event_id == flaky and calls[m.key].count(flaky) == 1):
            raise RuntimeError(f"cannot handle {m.event_id}")

    async with open_broker(case.url) as broker:
        runner = ConsumerRunner(
            broker,
            [topic],
            group,
            handler,
            retry=RetryPolicy(max_attempts=3, backoff=0.01, jitter=0),
        )
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            assert list(await broker.publish(batch)) == [None] * 5
            await wait_for(lambda: runner.handled + runner.dead_lettered == 5)
            tg.cancel_scope.cancel()
        assert (runner.handled, runner.dead_lettered) == (4, 1)
        # Retried in place, so a key's later events wait behind a failing one.
        assert calls == {
            "order-0": [batch[0].event_id, poison, poison, poison, batch[4].event_id],
            "order-1": [flaky, flaky, batch[3].event_id],
        }

        dlq = dead_letter_topic(group)
        async with open_consumer(broker, [dlq], dlq) as dead:
            (letter,) = await receive_n(dead, 1)
            assert letter.message.event_id == poison
            assert letter.message.value == batch[2].value
            assert letter.message.key == batch[2].key
            assert letter.message.headers[DEAD_LETTER_TOPIC] == topic
            assert "cannot handle" in letter.message.headers[DEAD_LETTER_REASON]
            await dead.ack(letter)

        marker = message(topic, "order-9", 9)
        assert list(await broker.publish([marker])) == [None]
        async with open_consumer(broker, [topic], group) as again:
            rest = await receive_until(again, marker.event_id)
            assert [d.message.event_id for d in rest] == [marker.event_id]


@pytest.mark.parametrize("case", SERVER_KINDS, indirect=True)
async def test_a_refused_message_fails_alone_and_later_events_of_its_key(
    case: BrokerCase,
) -> None:
    good, group = case.names.topic(), case.names.group()
    if case.kind == "kafka":
        bad = "not a valid topic!"
    elif case.kind == "rabbitmq":
        bad = case.names.topic("unbound")  # an exchange no queue is bound to: unroutable
    else:
        bad = case.names.topic("string")
        import redis

        client = redis.Redis(port=6379)
        client.set(bad, "not a stream")  # XADD to it: WRONGTYPE
        client.close()
    batch = [
        message(good, "k1", 1),
        message(bad, "k1", 2),
        message(good, "k1", 3),
        message(good, "k2", 4),
    ]
    async with open_broker(case.url) as broker, open_consumer(broker, [good], group) as consumer:
        results = list(await broker.publish(batch))
        assert results[0] is None and results[3] is None
        assert isinstance(results[1], PublishFailed)
        assert isinstance(results[2], PublishFailed)  # after a failure of its key: not acked...
        assert batch[1].event_id in str(results[2])
        got = await receive_n(consumer, 2)
        got += await consumer.receive(10, 0.5)
        # ... and not delivered either: event 3 of k1 must not overtake the retried event 2.
        assert sorted(d.message.event_id for d in got) == sorted(
            [batch[0].event_id, batch[3].event_id]
        )


async def test_publish_to_a_stopped_broker_fails_fast_and_recovers(server: ServerCase) -> None:
    topic, group = server.names.topic(), server.names.group()
    async with open_broker(server.url) as broker:
        async with open_consumer(broker, [topic], group):
            pass  # the group's queue now exists (RabbitMQ refuses unroutable messages)
        assert list(await broker.publish([message(topic, "k", 0)])) == [None]

        server.stop()
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as failure:
            await broker.publish([message(topic, "k", 1), message(topic, "k", 2)])
        assert time.monotonic() - started < 6  # timeout=2 in the URL: bounded, no hang
        assert "guest:guest" not in str(failure.value)  # no secrets in errors

        server.start()
        results = await publish_until_accepted(broker, [message(topic, "k", 1)], within=15)
        assert list(results) == [None]


async def test_a_black_hole_broker_is_bounded_and_a_cancelled_publish_returns_at_once(
    server: ServerCase,
) -> None:
    assert server.proxy is not None
    topic, group = server.names.topic(), server.names.group()
    async with open_broker(server.url) as broker:
        async with open_consumer(broker, [topic], group):
            pass
        assert list(await broker.publish([message(topic, "k", 0)])) == [None]

        server.proxy.stop()
        server.proxy.black_hole = True  # accepts connections, answers nothing
        server.proxy.start()
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await broker.publish([message(topic, "k", 1)])
        assert time.monotonic() - started < 6

        started = time.monotonic()
        with anyio.move_on_after(0.3):
            await broker.publish([message(topic, "k", 2)])
        assert time.monotonic() - started < 1.5  # cancellation is not stuck behind I/O

        server.proxy.stop()
        server.proxy.black_hole = False
        server.proxy.start()
        results = await publish_until_accepted(broker, [message(topic, "k", 3)], within=15)
        assert list(results) == [None]


async def test_the_runner_carries_on_after_the_broker_comes_back(server: ServerCase) -> None:
    topic, group = server.names.topic(), server.names.group()
    seen: list[str] = []

    async def handler(m: Message) -> None:
        seen.append(m.event_id)

    first, second = message(topic, "k", 1), message(topic, "k", 2)
    async with open_broker(server.url) as broker:
        runner = ConsumerRunner(broker, [topic], group, handler, poll_timeout=0.3)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            assert list(await broker.publish([first])) == [None]
            await wait_for(lambda: first.event_id in seen)
            server.stop()
            await anyio.sleep(0.5)
            server.start()
            assert list(await publish_until_accepted(broker, [second])) == [None]
            await wait_for(lambda: second.event_id in seen, within=30)
            tg.cancel_scope.cancel()
