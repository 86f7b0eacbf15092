"""In-process broker: the embedded default (``memory://``). Messages live in this process only."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from saga_core.events import Message


class InMemoryBroker:
    """Keeps published messages per topic in memory, in publish order.

    Useful for the embedded mode, the demo and tests. Nothing survives the process.
    """

    def __init__(self) -> None:
        self._topics: dict[str, list[Message]] = {}
        self._lock = anyio.Lock()
        self.closed = False

    async def publish(self, messages: Sequence[Message]) -> Sequence[BaseException | None]:
        """Append every message to its topic; all are acknowledged."""
        async with self._lock:
            for m in messages:
                self._topics.setdefault(m.topic, []).append(m)
        return [None] * len(messages)

    def messages(self, topic: str | None = None) -> list[Message]:
        """Messages published so far, for one topic or all of them (in each topic's order)."""
        if topic is not None:
            return list(self._topics.get(topic, ()))
        return [m for msgs in self._topics.values() for m in msgs]

    def topics(self) -> list[str]:
        """Topics that received at least one message."""
        return list(self._topics)

    async def aclose(self) -> None:
        """Nothing to release; marks the broker closed."""
        self.closed = True

    def __repr__(self) -> str:
        return "InMemoryBroker()"


def _from_url(url: str) -> InMemoryBroker:
    """``memory://`` takes no options."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.netloc or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"memory:// takes no host, path or options, got {url!r}")
    return InMemoryBroker()
