"""Pieces every adapter shares: per-key failure propagation and dead-letter copies."""

from __future__ import annotations

from collections.abc import Sequence

from saga_core.consumer import DEAD_LETTER_REASON, DEAD_LETTER_TOPIC, dead_letter_topic
from saga_core.errors import PublishFailed
from saga_core.events import Message

#: Header values longer than this are cut: a reason is for people, not for storage.
_MAX_REASON = 1000


def fail_rest_of_key(
    messages: Sequence[Message], results: Sequence[BaseException | None]
) -> list[BaseException | None]:
    """Once a message of a key failed, report every later message of that key failed too.

    Keys are compared across topics: the outbox orders events per key.

    The relay marks a key's events sent up to its first failure; reporting a later one as
    acknowledged would let it overtake the failed one. (The broker may still hold the later
    one: it is published again, a duplicate the consumer's inbox absorbs.)
    """
    out = list(results)
    failed: dict[str, str] = {}  # key -> event id of its first failure
    for i, (message, result) in enumerate(zip(messages, results, strict=True)):
        if message.key in failed:
            if result is None:
                earlier = failed[message.key]
                out[i] = PublishFailed(
                    f"not acknowledged: event {earlier} of the same key failed before it"
                )
        elif result is not None:
            failed[message.key] = message.headers.get("event_id", "?")
    return out


def dead_letter_copy(message: Message, group: str, reason: str) -> Message:
    """The copy of ``message`` that goes to ``group``'s dead-letter topic."""
    headers = dict(message.headers)
    headers[DEAD_LETTER_REASON] = reason[:_MAX_REASON]
    headers.setdefault(DEAD_LETTER_TOPIC, message.topic)
    return Message(dead_letter_topic(group), message.key, message.value, headers)
