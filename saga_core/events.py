"""Outbox events and the broker message shape (DESIGN.md section 4). Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from saga_core._fast_init import fast_init, unchecked_init
from saga_core._ids import new_uuid4
from saga_core._json import check_json, dumps
from saga_core._text import text_problem

#: The fields stored as text columns and sent as a key, topic or header: str (or None), valid
#: UTF-8, no NUL character.
_TEXT_FIELDS = ("aggregate_type", "aggregate_id", "event_type", "topic", "saga_id", "event_id")


def _check_text(value: object, what: str, *, nul_ok: bool = False) -> None:
    """Raise ``TypeError`` (not a str) or ``ValueError`` (not UTF-8, a NUL) naming ``what``."""
    problem = text_problem(value, nul_ok=nul_ok)
    if problem is not None:
        kind = ValueError if isinstance(value, str) else TypeError
        raise kind(f"{what} {problem}")


@fast_init
@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event to publish, written in the same transaction as the state change it announces.

    Args:
        aggregate_type: what kind of thing changed (``"order"``); the default topic.
        aggregate_id: which one; the message key, so one aggregate's events stay in order.
            Defaults to ``saga_id`` when a saga emits the event.
        event_type: what happened (``"order_created"``).
        payload: JSON-serialisable mapping; the message value.
        topic: overrides the topic (default: ``aggregate_type``, or ``"saga"``).
        headers: extra string headers.
        saga_id: set when a saga emitted the event.
        event_id: unique id, also the ``event_id`` header consumers deduplicate on.
    """

    aggregate_type: str | None = None
    aggregate_id: str | None = None
    event_type: str = ""
    payload: Mapping[str, Any] = field(default_factory=dict)
    topic: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    saga_id: str | None = None
    event_id: str = field(default_factory=new_uuid4)

    def __post_init__(self) -> None:
        if not self.event_type:
            raise ValueError("OutboxEvent.event_type is required")
        # The values alone first (no names, no messages): events are built on every step.
        for value in (
            self.aggregate_type,
            self.aggregate_id,
            self.event_type,
            self.topic,
            self.saga_id,
            self.event_id,
        ):
            if value is not None and not (
                type(value) is str and value.isascii() and "\x00" not in value
            ):  # text_problem's fast path, inline (a call per field costs as much again)
                for name in _TEXT_FIELDS:  # raises, naming the field
                    _check_text(getattr(self, name), f"OutboxEvent.{name}")
        if not isinstance(self.payload, Mapping):
            raise TypeError(
                f"OutboxEvent.payload must be a mapping, got {type(self.payload).__name__}"
            )
        check_json(self.payload, "OutboxEvent.payload")
        bad = [
            k for k, v in self.headers.items() if not isinstance(k, str) or not isinstance(v, str)
        ]
        if bad:
            raise TypeError(f"OutboxEvent.headers must map str to str; bad keys: {bad!r}")
        for k, v in self.headers.items():
            if not (k.isascii() and v.isascii()):  # both are str by now
                # Stored inside JSON (which escapes a NUL), sent as bytes: UTF-8 is enough.
                _check_text(k, "OutboxEvent.headers key", nul_ok=True)
                _check_text(v, f"OutboxEvent.headers[{k!r}]", nul_ok=True)
        if self.aggregate_id is None and self.saga_id is None:
            raise ValueError("OutboxEvent needs an aggregate_id (the message key) or a saga_id")

    @property
    def resolved_topic(self) -> str:
        """The topic it is published to."""
        return self.topic or self.aggregate_type or "saga"

    @property
    def key(self) -> str:
        """The message key: ``aggregate_id``, else the saga id."""
        return self.aggregate_id if self.aggregate_id is not None else str(self.saga_id)

    def message_headers(self, traceparent: str | None = None) -> dict[str, str]:
        """The headers every broker carries (section 4), the event's own extras first."""
        headers = dict(self.headers)
        headers.update(
            {
                "event_id": self.event_id,
                "event_type": self.event_type,
                "content-type": "application/json",
            }
        )
        if self.saga_id is not None:
            headers["saga_id"] = self.saga_id
        if traceparent:
            headers["traceparent"] = traceparent
        return headers

    def payload_json(self) -> str:
        """The payload as canonical JSON text."""
        return dumps(self.payload)


def _checked_event(
    aggregate_type: str | None,
    event_type: str,
    topic: str | None,
    saga_id: str,
    payload: dict[str, Any],
) -> OutboxEvent:
    """An ``OutboxEvent`` built from parts the caller has already checked, without
    ``__post_init__``'s checks: a saga step's event, on every step. Its names were checked when
    the step was defined, the saga id when the saga began, the payload's parts (the step's
    checked result, the step's name, a timestamp) as they were made."""
    event: OutboxEvent = object.__new__(OutboxEvent)
    _init_unchecked(
        event,
        aggregate_type=aggregate_type,
        event_type=event_type,
        payload=payload,
        topic=topic,
        saga_id=saga_id,
    )
    return event


_init_unchecked = unchecked_init(OutboxEvent)


@fast_init
@dataclass(frozen=True, slots=True)
class Message:
    """One message as handed to a broker adapter, or received from one.

    ``value`` is the UTF-8 JSON payload; ``headers`` always hold ``event_id``, ``event_type`` and
    ``content-type``.
    """

    topic: str
    key: str
    value: bytes
    headers: Mapping[str, str]

    @property
    def event_id(self) -> str:
        """The event id header (what an ``Inbox`` deduplicates on)."""
        return self.headers["event_id"]
