"""Outbox appends, in the writer's own transaction (DESIGN.md section 4).

Each event takes its key's next sequence number by an upsert of the key row, which also locks
that row until the writer commits: a key's sequence is gap-free and equal to commit order.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import Any

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
        _check_transaction(conn, "append_outbox")
        claims = self._append_many(conn, (event,), time.time(), {event.key} if claim else ())
        return claims[0] if claims else None

    def append_outbox_many(
        self, events: Sequence[OutboxEvent], *, conn: Connection, claim: bool = False
    ) -> list[ClaimedKey]:
        """Add ``events`` to the outbox inside the caller's transaction on ``conn``, in order.

        The same as calling :meth:`append_outbox` for each, in two statements instead of two
        per event. With ``claim=True``, returns a claim for each key whose first event here is
        its next one and which nobody holds (the claim carries all of that key's events here).
        """
        events = list(events)
        for i, event in enumerate(events):
            if not isinstance(event, OutboxEvent):
                raise TypeError(
                    f"append_outbox_many takes OutboxEvents; item {i} is {type(event).__name__}"
                )
        ids = [e.event_id for e in events]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"append_outbox_many: event id {dup!r} appears twice")
        _check_transaction(conn, "append_outbox_many")
        if not events:
            return []
        return self._append_many(
            conn, events, time.time(), {e.key for e in events} if claim else ()
        )

    def _append_many(
        self,
        conn: Connection,
        events: Sequence[OutboxEvent],
        now: float,
        claim_keys: Collection[str] = (),
    ) -> list[ClaimedKey]:
        """Append ``events``; claim those of ``claim_keys`` that may be published at once."""
        counts: dict[str, int] = {}
        for event in events:
            counts[event.key] = counts.get(event.key, 0) + 1
        # Keys in one order for every batched writer, so two of them never deadlock on each
        # other's key rows. One upsert takes every key's next ``n`` sequence numbers.
        keys = sorted(counts)
        last = self._take_seqs(conn, keys, [counts[k] for k in keys])
        next_seq = {k: last[k] - counts[k] + 1 for k in keys}
        rows: list[dict[str, Any]] = []
        headers: list[dict[str, str]] = []
        for event in events:
            key = event.key
            seq = next_seq[key]
            next_seq[key] = seq + 1
            headers.append(event.message_headers())
            rows.append(
                {
                    "b_event_id": event.event_id,
                    "b_saga_id": event.saga_id,
                    "b_topic": event.resolved_topic,
                    "b_key": key,
                    "b_seq": seq,
                    "b_event_type": event.event_type,
                    "b_payload": event.payload_json(),
                    "b_headers": dumps(headers[-1]),
                    "b_ts": now,
                }
            )
        row_ids = self._insert_events(conn, rows, ids=bool(claim_keys))
        self._notify_outbox(conn)
        if not claim_keys:
            return []
        return self._claim_new(conn, rows, headers, row_ids, now, claim_keys)

    def _take_seqs(
        self, conn: Connection, keys: Sequence[str], counts: Sequence[int]
    ) -> dict[str, int]:
        """Each key's last sequence number after taking its next ``counts[i]``; the key rows
        are locked in the order of ``keys``."""
        params = [{"b_key": k, "b_n": n} for k, n in zip(keys, counts, strict=True)]
        return dict(conn.execute(self.sql.next_seqs, params).all())

    def _insert_events(
        self, conn: Connection, rows: Sequence[dict[str, Any]], *, ids: bool
    ) -> dict[str, int]:
        """Insert the outbox ``rows``; with ``ids``, each row's id by event id."""
        if ids:
            return dict(conn.execute(self.sql.insert_events_ids, rows).all())
        self._execute_many(conn, self.sql.insert_events, rows)
        return {}

    def _claim_new(
        self,
        conn: Connection,
        rows: Sequence[Mapping[str, Any]],
        headers: Sequence[dict[str, str]],
        row_ids: Mapping[str, int],
        now: float,
        claim_keys: Collection[str],
    ) -> list[ClaimedKey]:
        """Claim each key whose first new row is its next event and which nobody holds.

        One token for every key claimed here: a claim is its (key, token) pair, and the keys of
        one transaction are claimed by one statement per number of new events per key.
        """
        by_key: dict[str, list[tuple[Mapping[str, Any], dict[str, str]]]] = {}
        for row, hdrs in zip(rows, headers, strict=True):
            if row["b_key"] in claim_keys:
                by_key.setdefault(row["b_key"], []).append((row, hdrs))
        by_count: dict[int, list[str]] = {}
        for key, key_rows in by_key.items():
            by_count.setdefault(len(key_rows), []).append(key)
        token = uuid.uuid4().hex
        claimed: list[str] = []
        for n, keys in by_count.items():
            params = {
                "b_keys": keys,
                "b_n": n,
                "b_token": token,
                "b_claim_seconds": self.optimistic_claim_seconds,
            }
            # The keys not claimed are the relay's, to send after what precedes them.
            claimed.extend(conn.execute(self.sql.claim_new_keys, params).scalars())
        return [
            ClaimedKey(
                key,
                token,
                tuple(_new_record(r, h, row_ids[r["b_event_id"]], now) for r, h in by_key[key]),
            )
            for key in claimed
        ]


def _check_transaction(conn: Connection, what: str) -> None:
    if not conn.in_transaction():
        raise ValueError(f"{what} needs a connection inside a transaction (engine.begin())")


def _new_record(
    row: Mapping[str, Any], headers: dict[str, str], row_id: int, now: float
) -> OutboxRecord:
    return OutboxRecord(
        id=row_id,
        event_id=row["b_event_id"],
        topic=row["b_topic"],
        key=row["b_key"],
        seq=row["b_seq"],
        event_type=row["b_event_type"],
        payload=row["b_payload"],
        headers=headers,
        status=OutboxStatus.PENDING,
        attempts=0,
        created_at=now,
    )
