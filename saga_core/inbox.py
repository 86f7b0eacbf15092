"""``Inbox``: consumer-side deduplication inside the handler's own transaction (DESIGN.md 4).

Delivery is at least once, so a consumer sees some messages twice. The inbox makes the effect
happen once: the handler's transaction first inserts ``(consumer, event_id)``; if that row
exists (a redelivery, or a concurrent duplicate that committed first), the handler does not run.
The broker message is acknowledged only after the transaction committed. "Processed" is never
recorded in a separate transaction, which would lose or duplicate effects on a crash between
the two.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from saga_core.events import Message

T = TypeVar("T")


@runtime_checkable
class InboxStore(Protocol):
    """Storage able to run a handler in a transaction guarded by an inbox row."""

    async def inbox_once(
        self, consumer: str, message_id: str, handler: Callable[[Any], T]
    ) -> tuple[bool, T | None]:
        """Run ``handler(conn)`` once per ``(consumer, message_id)``; ``(False, None)`` if the
        message was already processed."""
        ...


class Inbox:
    """Applies each message's effect once for one consumer name.

    ``handler(conn, message)`` is a sync function that makes its database changes on ``conn``
    (a SQLAlchemy ``Connection`` in the transaction that also records the message). Keep remote
    calls out of it: they are not rolled back with the transaction.

    Example with a consumer runner: ``runner = ConsumerRunner(consumer, inbox.wrap(apply))``.
    """

    def __init__(self, storage: InboxStore, consumer: str) -> None:
        if not isinstance(storage, InboxStore):
            raise TypeError(f"storage must implement InboxStore, got {type(storage).__name__}")
        if not consumer:
            raise ValueError("an Inbox needs a consumer name")
        self.storage = storage
        self.consumer = consumer

    async def handle(self, message: Message, handler: Callable[[Any, Message], object]) -> bool:
        """Apply ``handler`` to ``message`` unless this consumer already did; True if applied.

        Raises what the handler raises (then nothing was recorded, and a redelivery retries).
        """
        event_id = message.headers.get("event_id")
        if not event_id:
            raise ValueError(
                f"message on {message.topic!r} has no event_id header to deduplicate on"
            )
        applied, _ = await self.storage.inbox_once(
            self.consumer, event_id, lambda conn: handler(conn, message)
        )
        return applied

    def wrap(
        self, handler: Callable[[Any, Message], object]
    ) -> Callable[[Message], Awaitable[None]]:
        """An async message handler (for a consumer runner) that goes through this inbox."""

        async def handle(message: Message) -> None:
            await self.handle(message, handler)

        return handle
