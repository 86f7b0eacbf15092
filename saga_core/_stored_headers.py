"""Message headers read back from the outbox, with the JSON text they were stored as."""

from __future__ import annotations

import json


class StoredHeaders(dict[str, str]):
    """A plain ``dict`` of headers that also keeps the JSON text it was parsed from, so an
    adapter that sends headers as JSON (Redis Streams) sends that text instead of encoding
    the dict again. The relay never changes a message's headers once read."""

    __slots__ = ("json",)

    def __init__(self, text: str) -> None:
        super().__init__(json.loads(text))
        self.json = text
