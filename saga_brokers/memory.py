"""In-process broker: the embedded default (``memory://``). Messages live in this process only."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from saga_brokers._common import dead_letter_copy
from saga_core.consumer import Delivery, default_consumer_name
from saga_core.errors import BrokerError
from saga_core.events import Message

_Offset = tuple[str, int]  # (topic, index in that topic's log)


class InMemoryBroker:
    """Keeps published messages per topic in memory, in publish order.

    Useful for the embedded mode, the demo and tests. Nothing survives the process. Consumer
    groups work as on a server: each group reads every topic from its start, a message goes to
    one member of the group, and what a member received without acknowledging is handed out
    again when it closes.
    """

    def __init__(self) -> None:
        self._topics: dict[str, list[Message]] = {}
        self._lock = anyio.Lock()
        self.closed = False
        self._groups: dict[str, _Group] = {}
        self._changed: anyio.Event | None = None

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        """Append every message to its topic; all are acknowledged."""
        async with self._lock:
            for m in messages:
                self._topics.setdefault(m.topic, []).append(m)
        self._notify()
        return [None] * len(messages)

    def messages(self, topic: str | None = None) -> list[Message]:
        """Messages published so far, for one topic or all of them (in each topic's order)."""
        if topic is not None:
            return list(self._topics.get(topic, ()))
        return [m for msgs in self._topics.values() for m in msgs]

    def topics(self) -> list[str]:
        """Topics that received at least one message."""
        return list(self._topics)

    async def consumer(
        self, topics: Sequence[str], group: str, *, name: str | None = None
    ) -> InMemoryConsumer:
        """Join ``group`` on ``topics``; a new group starts at each topic's first message."""
        if isinstance(topics, str) or not topics:
            raise ValueError("consumer() needs a non-empty sequence of topic names")
        if self.closed:
            raise BrokerError("the in-memory broker is closed")
        state = self._groups.setdefault(group, _Group())
        return InMemoryConsumer(self, state, tuple(topics), group, name or default_consumer_name())

    async def aclose(self) -> None:
        """Nothing to release; marks the broker closed (consumers stop receiving)."""
        self.closed = True
        self._notify()

    def __repr__(self) -> str:
        return "InMemoryBroker()"

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_for_change(self, seconds: float) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._changed.wait()


@dataclass
class _Group:
    """Where one consumer group stands on each topic."""

    next_offset: dict[str, int] = field(default_factory=dict)
    returned: list[_Offset] = field(default_factory=list)  # heap: handed out again first
    in_flight: dict[_Offset, InMemoryConsumer] = field(default_factory=dict)
    deliveries: dict[_Offset, int] = field(default_factory=dict)


class InMemoryConsumer:
    """A member of an in-memory consumer group (see :class:`saga_core.consumer.BrokerConsumer`)."""

    def __init__(
        self, broker: InMemoryBroker, state: _Group, topics: tuple[str, ...], group: str, name: str
    ) -> None:
        self._broker = broker
        self._state = state
        self.topics = topics
        self.group = group
        self.name = name
        self._closed = False

    def __repr__(self) -> str:
        return f"InMemoryConsumer(group={self.group!r}, name={self.name!r})"

    async def __aenter__(self) -> InMemoryConsumer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def receive(self, max_messages: int = 100, max_wait: float = 1.0) -> list[Delivery]:
        """Up to ``max_messages`` messages: returned ones first, then new ones in topic order."""
        with anyio.move_on_after(max_wait):
            while True:
                if self._closed or self._broker.closed:
                    raise BrokerError(f"{self!r} is closed")
                batch = self._take(max_messages)
                if batch:
                    return batch
                await self._broker._wait_for_change(max_wait)
        return []

    def _take(self, limit: int) -> list[Delivery]:
        state, log = self._state, self._broker._topics
        taken: list[_Offset] = []
        skipped: list[_Offset] = []
        while state.returned and len(taken) < limit:
            where = heapq.heappop(state.returned)
            (taken if where[0] in self.topics else skipped).append(where)
        for where in skipped:
            heapq.heappush(state.returned, where)
        for topic in self.topics:
            start = state.next_offset.get(topic, 0)
            end = min(len(log.get(topic, ())), start + limit - len(taken))
            taken.extend((topic, i) for i in range(start, end))
            state.next_offset[topic] = max(start, end)
        out = []
        for where in taken:
            state.in_flight[where] = self
            state.deliveries[where] = state.deliveries.get(where, 0) + 1
            out.append(Delivery(_received(log[where[0]][where[1]]), state.deliveries[where], where))
        return out

    def _settle(self, delivery: Delivery) -> _Offset | None:
        where = delivery.token
        if not isinstance(where, tuple) or self._state.in_flight.get(where) is not self:
            return None  # not ours (any more): it was handed out again when we closed
        del self._state.in_flight[where]
        return where

    async def ack(self, delivery: Delivery) -> None:
        """Never hand this message to the group again."""
        where = self._settle(delivery)
        if where is not None:
            self._state.deliveries.pop(where, None)

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        """Hand it out again (``requeue``), or move it to the group's dead-letter topic."""
        if requeue:
            where = self._settle(delivery)
            if where is not None:
                heapq.heappush(self._state.returned, where)
                self._broker._notify()
            return
        token = delivery.token
        if isinstance(token, tuple) and self._state.in_flight.get(token) is self:
            await self._broker.publish([dead_letter_copy(delivery.message, self.group, reason)])
            await self.ack(delivery)

    async def aclose(self) -> None:
        """Leave the group: everything received and not acknowledged is handed out again."""
        if self._closed:
            return
        self._closed = True
        mine = [w for w, owner in self._state.in_flight.items() if owner is self]
        for where in mine:
            del self._state.in_flight[where]
            heapq.heappush(self._state.returned, where)
        if mine:
            self._broker._notify()


def _from_url(url: str) -> InMemoryBroker:
    """``memory://`` takes no options."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.netloc or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"memory:// takes no host, path or options, got {url!r}")
    return InMemoryBroker()


def _received(message: Message) -> Message:
    """The message as a consumer gets it: headers as a plain ``dict`` of its own, as the
    networked brokers deliver them (a relayed message's headers are a read-only mapping over
    their stored text; a consumer may change or JSON-encode its copy)."""
    headers = message.headers
    if type(headers) is dict:
        return message
    return Message(message.topic, message.key, message.value, dict(headers))
