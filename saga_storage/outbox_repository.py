"""The outbox half of the repository: appends in the writer's transaction, key claims for the
relay, dead letters, pruning, and the consumer inbox (DESIGN.md section 4)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import TypeVar

from sqlalchemy import Connection, func, select

from saga_core._json import dumps, loads
from saga_core.events import OutboxEvent
from saga_core.records import (
    ClaimedKey,
    OutboxRecord,
)
from saga_core.states import OutboxStatus
from saga_storage.base import StorageBase

T = TypeVar("T")


class OutboxRepository(StorageBase):
    """Outbox and inbox rows."""

    # --- outbox ----------------------------------------------------------------------------
    def append_outbox(self, event: OutboxEvent, *, conn: Connection) -> None:
        """Add ``event`` to the outbox inside the caller's transaction on ``conn``.

        It is published only if that transaction commits, in commit order for its key.
        """
        if not isinstance(event, OutboxEvent):
            raise TypeError(f"append_outbox takes an OutboxEvent, got {type(event).__name__}")
        if not conn.in_transaction():
            raise ValueError(
                "append_outbox needs a connection inside a transaction (engine.begin())"
            )
        self._append(conn, event, time.time())

    def _append(self, conn: Connection, event: OutboxEvent, now: float) -> None:
        key = event.key
        seq = conn.execute(self.sql.next_seq, {"b_key": key}).scalar_one()
        conn.execute(
            self.sql.insert_event,
            {
                "b_event_id": event.event_id,
                "b_saga_id": event.saga_id,
                "b_topic": event.resolved_topic,
                "b_key": key,
                "b_seq": seq,
                "b_event_type": event.event_type,
                "b_payload": event.payload_json(),
                "b_headers": dumps(event.message_headers()),
                "b_ts": now,
            },
        )

    async def claim_outbox(
        self, owner: str, *, max_keys: int, max_events: int, claim_seconds: float
    ) -> list[ClaimedKey]:
        """Claim keys with unsent events (each key's next ``max_events`` events, in order)."""
        return await self._run(self._claim_outbox, max_keys, max_events, claim_seconds)

    def _claim_outbox(
        self, max_keys: int, max_events: int, claim_seconds: float
    ) -> list[ClaimedKey]:
        token = uuid.uuid4().hex
        with self._write() as conn:
            keys = list(conn.execute(self.sql.claimable_keys, {"b_limit": max_keys}).scalars())
            if not keys:
                return []
            conn.execute(
                self.sql.claim_keys,
                {"b_keys": keys, "b_token": token, "b_claim_seconds": claim_seconds},
            )
            rows = conn.execute(
                self.sql.claimed_events, {"b_token": token, "b_per_key": max_events}
            ).all()
        by_key: dict[str, list[OutboxRecord]] = {k: [] for k in keys}
        for r in rows:
            m = r._mapping
            by_key[m["key"]].append(
                OutboxRecord(
                    id=m["id"],
                    event_id=m["event_id"],
                    topic=m["topic"],
                    key=m["key"],
                    seq=m["seq"],
                    event_type=m["event_type"],
                    payload=m["payload"],
                    headers=loads(m["headers"]),
                    status=OutboxStatus(m["status"]),
                    attempts=m["attempts"],
                    created_at=m["created_at"],
                    last_error=m["last_error"],
                )
            )
        return [ClaimedKey(k, token, tuple(evs)) for k, evs in by_key.items()]

    async def complete_outbox(
        self, claim: ClaimedKey, sent: int, error: str | None, *, retry_in: float, dead_after: int
    ) -> None:
        """Record a publish result for a claimed key (see ``OutboxStore.complete_outbox``)."""
        await self._run(self._complete_outbox, claim, sent, error, retry_in, dead_after)

    def _complete_outbox(
        self, claim: ClaimedKey, sent: int, error: str | None, retry_in: float, dead_after: int
    ) -> None:
        if not claim.events:
            return self._release_outbox(claim, 0.0)
        first_seq = claim.events[0].seq - 1
        sent_seq = claim.events[sent - 1].seq if sent else first_seq
        with self._write() as conn:
            res = conn.execute(
                self.sql.finish_key,
                {
                    "b_key": claim.key,
                    "b_token": claim.token,
                    "b_sent_seq": sent_seq,
                    "b_retry_in": retry_in if error else 0.0,
                },
            )
            if res.rowcount != 1:
                return None  # claim expired and was taken over: that relay republishes
            if sent:
                conn.execute(
                    self.sql.mark_sent,
                    {
                        "b_key": claim.key,
                        "b_from_seq": first_seq,
                        "b_to_seq": sent_seq,
                        "b_ts": time.time(),
                    },
                )
            if error is not None and sent < len(claim.events):
                failed = claim.events[sent]
                attempts = conn.execute(
                    self.sql.fail_event, {"b_id": failed.id, "b_error": error[:2000]}
                ).scalar_one()
                if attempts >= dead_after:
                    conn.execute(self.sql.kill_event, {"b_id": failed.id})
                    conn.execute(self.sql.block_key, {"b_key": claim.key})
        return None

    async def release_outbox(self, claim: ClaimedKey, *, retry_in: float) -> None:
        """Give a claimed key back untouched, retrying it after ``retry_in`` seconds."""
        await self._run(self._release_outbox, claim, retry_in)

    def _release_outbox(self, claim: ClaimedKey, retry_in: float) -> None:
        sent_seq = claim.events[0].seq - 1 if claim.events else None
        with self._write() as conn:
            if sent_seq is None:
                conn.execute(self.sql.unclaim_key, {"b_key": claim.key, "b_token": claim.token})
                return
            conn.execute(
                self.sql.finish_key,
                {
                    "b_key": claim.key,
                    "b_token": claim.token,
                    "b_sent_seq": sent_seq,
                    "b_retry_in": retry_in,
                },
            )

    async def outbox_counts(self) -> Mapping[str, int]:
        """Number of outbox events per status."""
        return await self._run(self._outbox_counts)

    def _outbox_counts(self) -> Mapping[str, int]:
        outbox = self.tables.outbox
        stmt = select(outbox.c.status, func.count()).group_by(outbox.c.status)
        with self._read() as conn:
            return {status: n for status, n in conn.execute(stmt).all()}
