"""Outbox appends, in the writer's own transaction (DESIGN.md section 4).

Each event takes its key's next sequence number by an upsert of the key row, which also locks
that row until the writer commits: a key's sequence is gap-free and equal to commit order.
"""

from __future__ import annotations

import time
import uuid

from sqlalchemy import Connection

from saga_core._json import dumps
from saga_core.events import OutboxEvent
from saga_core.records import ClaimedKey, OutboxRecord
from saga_core.states import OutboxStatus
from saga_storage.base import StorageBase


class OutboxAppender(StorageBase):
    """Appends outbox events inside the caller's transaction."""

    #: How long an optimistic claim lasts; the relay takes the key over after that.
    optimistic_claim_seconds = 10.0
    #: Whether a relay round completes all its keys in one transaction. Only where writers
    #: are serialised anyway (SQLite): with row locks it could deadlock with a writer.
    complete_round_in_one_transaction = False

    def append_outbox(
        self, event: OutboxEvent, *, conn: Connection, claim: bool = False
    ) -> ClaimedKey | None:
        """Add ``event`` to the outbox inside the caller's transaction on ``conn``.

        It is published only if that transaction commits, in commit order for its key. With
        ``claim=True`` (used by ``OptimisticPublisher``), the key is also claimed when nobody
        holds it and this event is its next one; the claim is returned, to publish after commit.
        """
        if not isinstance(event, OutboxEvent):
            raise TypeError(f"append_outbox takes an OutboxEvent, got {type(event).__name__}")
        if not conn.in_transaction():
            raise ValueError(
                "append_outbox needs a connection inside a transaction (engine.begin())"
            )
        return self._append(conn, event, time.time(), claim)

    def _append(
        self, conn: Connection, event: OutboxEvent, now: float, claim: bool = False
    ) -> ClaimedKey | None:
        key = event.key
        seq = conn.execute(self.sql.next_seq, {"b_key": key}).scalar_one()
        headers = event.message_headers()
        payload = event.payload_json()
        row_id = conn.execute(
            self.sql.insert_event,
            {
                "b_event_id": event.event_id,
                "b_saga_id": event.saga_id,
                "b_topic": event.resolved_topic,
                "b_key": key,
                "b_seq": seq,
                "b_event_type": event.event_type,
                "b_payload": payload,
                "b_headers": dumps(headers),
                "b_ts": now,
            },
        ).scalar_one()
        self._notify_outbox(conn)
        if not claim:
            return None
        token = uuid.uuid4().hex
        claimed = conn.execute(
            self.sql.claim_next,
            {
                "b_key": key,
                "b_seq": seq,
                "b_token": token,
                "b_claim_seconds": self.optimistic_claim_seconds,
            },
        )
        if claimed.rowcount != 1:
            return None  # the relay will send it, after what precedes it
        record = OutboxRecord(
            id=row_id,
            event_id=event.event_id,
            topic=event.resolved_topic,
            key=key,
            seq=seq,
            event_type=event.event_type,
            payload=payload,
            headers=headers,
            status=OutboxStatus.PENDING,
            attempts=0,
            created_at=now,
        )
        return ClaimedKey(key, token, (record,))
