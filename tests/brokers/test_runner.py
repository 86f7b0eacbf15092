"""ConsumerRunner, in-memory consumer groups and the adapters' shared helpers (no server)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import anyio
import pytest

from saga_brokers import InMemoryBroker, InMemoryConsumer
from saga_brokers._common import fail_rest_of_key
from saga_brokers._loop_thread import LoopThread
from saga_core.consumer import (
    DEAD_LETTER_REASON,
    ConsumerRunner,
    Delivery,
    dead_letter_topic,
)
from saga_core.errors import BrokerUnavailable, PublishFailed, StepRejected
from saga_core.events import Message
from saga_core.retry import RetryPolicy
from tests.brokers.helpers import message, receive_n, wait_for

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_attempts=3, backoff=0.001, jitter=0)


async def test_memory_publish_and_inspection_are_unchanged() -> None:
    broker = InMemoryBroker()
    a, b = message("orders", "o-1", 1), message("payments", "p-1", 2)
    assert list(await broker.publish([a, b])) == [None, None]
    assert broker.messages("orders") == [a]
    assert broker.messages() == [a, b]
    assert broker.topics() == ["orders", "payments"]
    await broker.aclose()
    assert broker.closed


async def test_memory_groups_are_independent_and_members_share_a_group() -> None:
    broker = InMemoryBroker()
    batch = [message("orders", "o", i) for i in range(4)]
    await broker.publish(batch)
    billing_1 = await broker.consumer(["orders"], "billing")
    billing_2 = await broker.consumer(["orders"], "billing")
    shipping = await broker.consumer(["orders"], "shipping")
    first = await billing_1.receive(2, 0.1)
    second = await billing_2.receive(10, 0.1)
    assert [d.message for d in first + second] == batch  # each message to one member
    assert [d.message for d in await receive_n(shipping, 4)] == batch  # every group gets all
    await billing_1.reject(first[0], requeue=True)
    (again,) = await billing_2.receive(10, 0.1)
    assert again.message == batch[0] and again.attempt == 2
    for c in (billing_1, billing_2, shipping):
        await c.aclose()


async def test_memory_receive_waits_for_a_publish() -> None:
    broker = InMemoryBroker()
    consumer = await broker.consumer(["orders"], "g")
    got: list[Delivery] = []

    async def receive() -> None:
        got.extend(await consumer.receive(10, 5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        await anyio.sleep(0.05)
        await broker.publish([message("orders", "o", 1)])
    assert len(got) == 1
    assert await consumer.receive(10, 0.05) == []


async def test_the_runner_dead_letters_a_clean_refusal_without_retrying() -> None:
    broker = InMemoryBroker()
    calls = 0

    async def handler(m: Message) -> None:
        nonlocal calls
        calls += 1
        raise StepRejected("not for us")

    runner = ConsumerRunner(broker, ["orders"], "g", handler, retry=FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await broker.publish([message("orders", "o", 1)])
        await wait_for(lambda: runner.dead_lettered == 1)
        tg.cancel_scope.cancel()
    assert calls == 1
    (letter,) = broker.messages(dead_letter_topic("g"))
    assert "StepRejected: not for us" in letter.headers[DEAD_LETTER_REASON]


async def test_a_message_that_keeps_killing_its_consumer_is_dead_lettered_unhandled() -> None:
    broker = InMemoryBroker()
    poison = message("orders", "o", 1)
    await broker.publish([poison])
    for _ in range(3):  # three consumers take it and die without acknowledging
        consumer = await broker.consumer(["orders"], "g")
        await receive_n(consumer, 1)
        await consumer.aclose()
    handled: list[Message] = []

    async def handler(m: Message) -> None:
        handled.append(m)

    runner = ConsumerRunner(broker, ["orders"], "g", handler, retry=FAST)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await wait_for(lambda: runner.dead_lettered == 1)
        tg.cancel_scope.cancel()
    assert handled == []
    (letter,) = broker.messages(dead_letter_topic("g"))
    assert "delivered 4 times" in letter.headers[DEAD_LETTER_REASON]


async def test_a_cancelled_runner_leaves_the_message_it_was_handling_for_the_next() -> None:
    broker = InMemoryBroker()
    started = anyio.Event()

    async def stuck(m: Message) -> None:
        started.set()
        await anyio.sleep_forever()

    runner = ConsumerRunner(broker, ["orders"], "g", stuck)
    await broker.publish([message("orders", "o", 1)])
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await started.wait()
        tg.cancel_scope.cancel()
    assert runner.handled == 0
    consumer = await broker.consumer(["orders"], "g")
    (again,) = await receive_n(consumer, 1)
    assert again.attempt == 2


class _FlakyBroker(InMemoryBroker):
    """Its first consumer loses the broker on its second receive."""

    def __init__(self) -> None:
        super().__init__()
        self.consumers = 0

    async def consumer(
        self, topics: Sequence[str], group: str, *, name: str | None = None
    ) -> InMemoryConsumer:
        self.consumers += 1
        real = await super().consumer(topics, group, name=name)
        if self.consumers > 1:
            return real
        calls = 0
        original = real.receive

        async def receive(max_messages: int = 100, max_wait: float = 1.0) -> list[Delivery]:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise BrokerUnavailable("connection lost")
            return await original(max_messages, max_wait)

        real.receive = receive  # type: ignore[method-assign]
        return real


async def test_the_runner_reconnects_and_gets_unacknowledged_messages_again() -> None:
    broker = _FlakyBroker()
    seen: list[str] = []

    async def handler(m: Message) -> None:
        seen.append(m.event_id)

    first, second = message("orders", "o", 1), message("orders", "o", 2)
    await broker.publish([first])
    runner = ConsumerRunner(broker, ["orders"], "g", handler, poll_timeout=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await wait_for(lambda: first.event_id in seen)
        await broker.publish([second])
        await wait_for(lambda: second.event_id in seen)
        tg.cancel_scope.cancel()
    assert broker.consumers >= 2
    assert seen == [first.event_id, second.event_id]


def test_runner_arguments_are_checked() -> None:
    async def handler(m: Message) -> None: ...

    broker = InMemoryBroker()
    with pytest.raises(TypeError):
        ConsumerRunner(broker, "orders", "g", handler)
    with pytest.raises(ValueError, match="at least one topic"):
        ConsumerRunner(broker, [], "g", handler)


def test_a_failure_fails_the_later_events_of_its_key_only() -> None:
    batch = [
        message("a", "k1", 1),
        message("b", "k1", 2),
        message("a", "k2", 3),
        message("a", "k1", 4),
    ]
    refused = PublishFailed("too large")
    results = fail_rest_of_key(batch, [None, refused, None, None])
    assert results[:3] == [None, refused, None]
    assert isinstance(results[3], PublishFailed)
    assert batch[1].event_id in str(results[3])


async def test_the_loop_thread_runs_coroutines_for_asyncio_and_trio_callers() -> None:
    loop_thread = LoopThread("test-loop")
    try:

        async def private() -> str:
            await asyncio.sleep(0.01)
            return "ran on asyncio"

        assert await loop_thread.run(private) == "ran on asyncio"

        async def fails() -> None:
            raise KeyError("boom")

        with pytest.raises(KeyError):
            await loop_thread.run(fails)

        async def slow() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled_on_loop.append(True)
                raise

        cancelled_on_loop: list[bool] = []
        with anyio.move_on_after(0.05):
            await loop_thread.run(slow)
        await wait_for(lambda: bool(cancelled_on_loop), within=5)  # cancelling reached it
    finally:
        await anyio.to_thread.run_sync(loop_thread.stop, 5)
