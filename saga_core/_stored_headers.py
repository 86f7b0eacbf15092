"""Message headers read back from the outbox, with the JSON text they were stored as."""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any

from saga_core._json import loads


class StoredHeaders(Mapping[str, str]):
    """Read-only headers that keep the JSON text they were stored as, parsed on first use.

    An adapter that sends headers as JSON (Redis Streams) sends ``json`` as it is: neither
    parsed nor encoded again, for the thousand events of a relay round. The others read the
    headers as a mapping, which parses the text once. The relay never changes a message's
    headers once read.
    """

    __slots__ = ("_parsed", "json")

    def __init__(self, text: str) -> None:
        self.json = text
        self._parsed: dict[str, str] | None = None

    def _headers(self) -> dict[str, str]:
        if self._parsed is None:
            self._parsed = loads(self.json)
        return self._parsed

    def __getitem__(self, name: str) -> str:
        return self._headers()[name]

    def get(self, name: str, default: Any = None) -> Any:
        """The header's value, or ``default``."""
        return self._headers().get(name, default)

    # The parsed dict's own views: the Mapping mixins would call __getitem__ per header, a
    # cost adapters that copy every header (Kafka, RabbitMQ) paid for each relayed event.
    def items(self) -> ItemsView[str, str]:
        """The headers' (name, value) pairs."""
        return self._headers().items()

    def keys(self) -> KeysView[str]:
        """The header names."""
        return self._headers().keys()

    def values(self) -> ValuesView[str]:
        """The header values."""
        return self._headers().values()

    def __contains__(self, name: object) -> bool:
        return name in self._headers()

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers())

    def __len__(self) -> int:
        return len(self._headers())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._headers() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a mapping, compared by value

    def __repr__(self) -> str:
        return f"StoredHeaders({self._headers()!r})"
