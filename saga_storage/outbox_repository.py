"""The outbox half of the repository: key claims for the relay, dead letters, pruning, and the
consumer inbox (DESIGN.md section 4). Appends are in ``outbox_append``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import Row

from saga_core._json import loads
from saga_core._stored_headers import StoredHeaders
from saga_core.records import ClaimedKey, OutboxRecord, OutboxStats
from saga_core.states import OutboxStatus
from saga_storage.coalesce import Pending
from saga_storage.outbox_append import OutboxAppender

T = TypeVar("T")
#: A claim's publish result: the claim, events acknowledged, the error of the first refused.
_Result = tuple[ClaimedKey, int, str | None]


class OutboxRepository(OutboxAppender):
    """Outbox and inbox rows: the relay's claims, operations, the inbox."""

    # --- outbox: relay ------------------------------------------------------------------
    async def committed_claims(self, claims: Sequence[ClaimedKey]) -> list[ClaimedKey]:
        """The claims whose transaction committed (a rolled-back one left no claim behind)."""
        return await self._run(self._committed_claims, claims)

    def _committed_claims(self, claims: Sequence[ClaimedKey]) -> list[ClaimedKey]:
        with self._read() as conn:
            return [
                c
                for c in claims
                if conn.execute(self.sql.claim_alive, {"b_key": c.key, "b_token": c.token}).first()
                is not None
            ]

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
            self._plan_by_key(conn)
            keys = list(conn.execute(self.sql.claimable_keys, {"b_limit": max_keys}).scalars())
            if not keys:
                return []
            conn.execute(
                self.sql.claim_keys,
                {"b_keys": keys, "b_token": token, "b_claim_seconds": claim_seconds},
            )
            rows = self._fetch_all(
                conn, self.sql.claimed_events, {"b_keys": keys, "b_per_key": max_events}
            )
        by_key: dict[str, list[OutboxRecord]] = {k: [] for k in keys}
        for row in rows:
            record = _claimed(row)
            by_key[record.key].append(record)
        return [ClaimedKey(k, token, tuple(evs)) for k, evs in by_key.items()]

    async def complete_outbox(
        self,
        claim: ClaimedKey,
        sent: int,
        error: str | None,
        *,
        retry_in: float,
        dead_after: int,
        follow: int = 0,
    ) -> ClaimedKey | None:
        """Record a publish result for a claimed key (see ``OutboxStore.complete_outbox``).

        With ``follow > 0`` and every event sent, the claim is kept when more events of the key
        were committed meanwhile: they are returned (up to ``follow``) to publish next.
        """
        return await self._run(
            self._complete_outbox, claim, sent, error, retry_in, dead_after, follow
        )

    async def complete_outbox_many(
        self,
        results: Sequence[tuple[ClaimedKey, int, str | None]],
        *,
        retry_in: float,
        dead_after: int,
        follow: int = 0,
    ) -> list[ClaimedKey]:
        """``complete_outbox`` for a whole relay round; returns the follow-up claims.

        One transaction completes every key whose row it can lock at once; a key a writer holds
        right now (or whose claim was taken over) is completed afterwards in its own
        transaction, exactly as ``complete_outbox`` does.
        """
        if not results:
            return []
        if not self.coalesce:
            return await self._run(self._complete_many, results, retry_in, dead_after, follow)
        follows: list[ClaimedKey] = await self._completions.submit(
            results, retry_in, dead_after, follow
        )
        return follows

    def _complete_batch(self, batch: list[Pending[Any]]) -> None:
        """``_complete_many`` for the results of many concurrent callers: one transaction for
        all (per set of options), each caller given back the follow-ups of its own claims."""
        groups: dict[tuple[float, int, int], list[Pending[Any]]] = {}
        for item in batch:
            groups.setdefault(item.args[1:], []).append(item)
        for (retry_in, dead_after, follow), items in groups.items():
            owner: dict[tuple[str, str], list[ClaimedKey]] = {}
            results: list[_Result] = []
            for item in items:
                mine: list[ClaimedKey] = []
                item.result = mine
                for result in item.args[0]:
                    owner[result[0].key, result[0].token] = mine
                    results.append(result)
            try:
                follows = self._complete_many(results, retry_in, dead_after, follow)
            except Exception as exc:
                for item in items:
                    item.error = exc
                    item.done = True
                continue
            for claim in follows:
                owner[claim.key, claim.token].append(claim)
            for item in items:
                item.done = True

    def _complete_many(
        self,
        results: Sequence[_Result],
        retry_in: float,
        dead_after: int,
        follow: int,
    ) -> list[ClaimedKey]:
        if not results:
            return []
        follows, later = self._complete_round(results, retry_in, dead_after, follow)
        for claim, sent, error in later:
            # Alone in its transaction: waiting here for a writer's lock holds no other key.
            more = self._complete_outbox(claim, sent, error, retry_in, dead_after, follow)
            if more is not None:
                follows.append(more)
        return follows

    def _complete_round(
        self,
        results: Sequence[_Result],
        retry_in: float,
        dead_after: int,
        follow: int,
    ) -> tuple[list[ClaimedKey], list[_Result]]:
        """Complete, in one transaction, the keys whose rows are free and still ours; returns
        the follow-up claims and the results left for a transaction of their own."""
        follows: list[ClaimedKey] = []
        done: list[tuple[ClaimedKey, int]] = []
        later: list[_Result] = []
        with self._write() as conn:
            self._plan_by_key(conn)
            held = self._lock_claimed(conn, [claim for claim, _, _ in results])
            for claim, sent, error in results:
                if held.get(claim.key) != claim.token:
                    later.append((claim, sent, error))
                elif error is None and claim.events:  # every event sent: the usual case
                    done.append((claim, sent))
                else:  # a refusal or nothing to send: rare, one key at a time
                    more = self._complete_in(conn, claim, sent, error, retry_in, dead_after, follow)
                    if more is not None:
                        follows.append(more)
            if follow > 0:
                follows.extend(self._advance_and_follow_keys(conn, done, follow))
            else:
                self._finish_keys(conn, done)
        return follows, later

    def _lock_claimed(self, conn: Connection, claims: Sequence[ClaimedKey]) -> dict[str, str]:
        """Lock the key rows of ``claims``, never waiting for one a writer holds (SKIP LOCKED);
        returns the claim token each locked row carries (``None`` for no claim)."""
        keys = [claim.key for claim in claims]
        return dict(conn.execute(self.sql.lock_keys, {"b_keys": keys}).all())

    def _mark_sent_keys(
        self, conn: Connection, done: Sequence[tuple[ClaimedKey, int]]
    ) -> dict[int, list[str]]:
        """Mark sent the acknowledged events of locked keys, by one statement per number of
        events sent (a relay round or a saga's step usually has one); returns those groups."""
        groups: dict[int, list[str]] = {}
        for claim, sent in done:
            groups.setdefault(sent, []).append(claim.key)
        now = time.time()
        for sent, keys in groups.items():
            conn.execute(self.sql.mark_sent_keys, {"b_keys": keys, "b_sent": sent, "b_ts": now})
        return groups

    def _finish_keys(self, conn: Connection, done: Sequence[tuple[ClaimedKey, int]]) -> None:
        """Mark sent the events of locked keys whose events were all acknowledged, then advance
        and release those keys: set-based, no row count to check (the rows are ours)."""
        for sent, keys in self._mark_sent_keys(conn, done).items():
            conn.execute(self.sql.finish_keys, {"b_keys": keys, "b_sent": sent})

    def _advance_and_follow_keys(
        self, conn: Connection, done: Sequence[tuple[ClaimedKey, int]], follow: int
    ) -> list[ClaimedKey]:
        """As ``_finish_keys``, but keep each key claimed when more of its events were committed
        meanwhile: those (up to ``follow`` per key) are returned as its follow-up claim."""
        if not done:
            return []
        for sent, keys in self._mark_sent_keys(conn, done).items():
            conn.execute(
                self.sql.advance_keys,
                {"b_keys": keys, "b_sent": sent, "b_claim_seconds": self.optimistic_claim_seconds},
            )
        keys = [claim.key for claim, _ in done]
        rows = self._fetch_all(conn, self.sql.claimed_events, {"b_keys": keys, "b_per_key": follow})
        more: dict[str, list[OutboxRecord]] = {}
        for row in rows:
            record = _claimed(row)
            more.setdefault(record.key, []).append(record)
        idle = [key for key in keys if key not in more]
        if idle:
            conn.execute(self.sql.unclaim_keys, {"b_keys": idle})
        tokens = {claim.key: claim.token for claim, _ in done}
        return [ClaimedKey(key, tokens[key], tuple(evs)) for key, evs in more.items()]

    def _complete_outbox(
        self,
        claim: ClaimedKey,
        sent: int,
        error: str | None,
        retry_in: float,
        dead_after: int,
        follow: int = 0,
    ) -> ClaimedKey | None:
        with self._write() as conn:
            return self._complete_in(conn, claim, sent, error, retry_in, dead_after, follow)

    def _complete_in(
        self,
        conn: Connection,
        claim: ClaimedKey,
        sent: int,
        error: str | None,
        retry_in: float,
        dead_after: int,
        follow: int,
    ) -> ClaimedKey | None:
        if not claim.events:
            conn.execute(self.sql.unclaim_key, {"b_key": claim.key, "b_token": claim.token})
            return None
        first_seq = claim.events[0].seq - 1
        sent_seq = claim.events[sent - 1].seq if sent else first_seq
        if follow > 0 and error is None and sent == len(claim.events):
            return self._advance_and_follow(conn, claim, first_seq, sent_seq, follow)
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

    def _advance_and_follow(
        self, conn: Connection, claim: ClaimedKey, first_seq: int, sent_seq: int, follow: int
    ) -> ClaimedKey | None:
        res = conn.execute(
            self.sql.advance_claimed,
            {
                "b_key": claim.key,
                "b_token": claim.token,
                "b_sent_seq": sent_seq,
                "b_claim_seconds": self.optimistic_claim_seconds,
            },
        )
        if res.rowcount != 1:
            return None  # claim expired and was taken over
        conn.execute(
            self.sql.mark_sent,
            {
                "b_key": claim.key,
                "b_from_seq": first_seq,
                "b_to_seq": sent_seq,
                "b_ts": time.time(),
            },
        )
        rows = conn.execute(
            self.sql.claimed_events, {"b_keys": [claim.key], "b_per_key": follow}
        ).all()
        if not rows:
            conn.execute(self.sql.unclaim_key, {"b_key": claim.key, "b_token": claim.token})
            return None
        return ClaimedKey(claim.key, claim.token, tuple(_claimed(r) for r in rows))

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
        with self._read() as conn:
            return {status: n for status, n in conn.execute(self.sql.count_by_status).all()}

    async def outbox_stats(self) -> OutboxStats:
        """Pending, in flight, dead, blocked keys and the age of the oldest pending event."""
        return await self._run(self._outbox_stats)

    def _outbox_stats(self) -> OutboxStats:
        with self._read() as conn:
            counts = {status: n for status, n in conn.execute(self.sql.count_by_status).all()}
            oldest = conn.execute(self.sql.oldest_pending).scalar()
            blocked = conn.execute(self.sql.count_blocked).scalar_one()
            claimed = conn.execute(self.sql.count_claimed).scalar_one()
        return OutboxStats(
            pending=counts.get("PENDING", 0),
            sent=counts.get("SENT", 0),
            dead=counts.get("DEAD", 0),
            claimed_keys=int(claimed),
            blocked_keys=int(blocked),
            oldest_pending_age=None if oldest is None else max(0.0, time.time() - oldest),
        )

    async def dead_events(self, limit: int = 100) -> list[OutboxRecord]:
        """Events marked ``DEAD`` (oldest first), with their last error."""
        return await self._run(self._dead_events, limit)

    def _dead_events(self, limit: int) -> list[OutboxRecord]:
        with self._read() as conn:
            return [_record(r) for r in conn.execute(self.sql.list_dead, {"b_limit": limit})]

    async def replay_key(self, key: str) -> OutboxRecord:
        """Resume a blocked key at its dead event (fresh attempts). ``LookupError`` if the key
        has no dead event."""
        return await self._run(self._replay_key, key)

    def _replay_key(self, key: str) -> OutboxRecord:
        with self._write() as conn:
            row = conn.execute(self.sql.dead_of_key, {"b_key": key}).first()
            if row is None:
                raise LookupError(f"outbox key {key!r} has no dead event")
            conn.execute(self.sql.unblock_key, {"b_key": key})
            conn.execute(self.sql.revive_event, {"b_id": row.id})
        return _record(row)

    async def skip_event(self, event_id: str, note: str) -> OutboxRecord:
        """Mark a dead event as sent without publishing it and let its key flow on.

        The only way past a dead event. ``LookupError`` if ``event_id`` is not dead.
        """
        return await self._run(self._skip_event, event_id, note)

    def _skip_event(self, event_id: str, note: str) -> OutboxRecord:
        with self._write() as conn:
            row = conn.execute(self.sql.dead_by_event, {"b_event_id": event_id}).first()
            if row is None:
                raise LookupError(f"no dead outbox event with id {event_id!r}")
            # Key row first (lock order): it must be waiting exactly at this event.
            moved = conn.execute(self.sql.advance_key, {"b_key": row.key, "b_seq": row.seq})
            if moved.rowcount != 1:
                raise LookupError(f"event {event_id!r} is not the next one of key {row.key!r}")
            conn.execute(
                self.sql.skip_event,
                {"b_id": row.id, "b_ts": time.time(), "b_note": f"skipped: {note}"},
            )
        return _record(row)

    async def prune_outbox(self, older_than: float, *, batch: int = 1000) -> int:
        """Delete events sent more than ``older_than`` seconds ago; returns how many.

        The outbox is walked in id order, ``batch`` rows per transaction, up to the first
        events created after the cutoff. Key counters are kept, so order survives pruning."""
        return await self._run(self._prune_outbox, older_than, batch)

    def _prune_outbox(self, older_than: float, batch: int) -> int:
        total = 0
        before = time.time() - older_than
        after = -1
        while True:
            with self._write() as conn:
                window = conn.execute(
                    self.sql.prune_window, {"b_after": after, "b_limit": batch}
                ).all()
                ids = [
                    id_
                    for id_, status, sent_at, _ in window
                    if status == "SENT" and sent_at is not None and sent_at < before
                ]
                if ids:
                    conn.execute(self.sql.delete_events, {"b_ids": ids})
            total += len(ids)
            if len(window) < batch or window[-1][3] >= before:
                return total
            after = window[-1][0]

    # --- inbox -------------------------------------------------------------------------------
    async def inbox_once(
        self, consumer: str, message_id: str, handler: Callable[[Connection], T]
    ) -> tuple[bool, T | None]:
        """Run ``handler(conn)`` in a transaction that first records ``(consumer, message_id)``.

        Returns ``(True, result)`` when it ran and committed, ``(False, None)`` for a duplicate
        (already processed, or processed concurrently and committed first): then nothing runs.
        """
        return await self._run(self._inbox_once, consumer, message_id, handler)

    def _inbox_once(
        self, consumer: str, message_id: str, handler: Callable[[Connection], T]
    ) -> tuple[bool, T | None]:
        with self._write() as conn:
            first = conn.execute(
                self.sql.inbox_insert,
                {"b_consumer": consumer, "b_message_id": message_id, "b_ts": time.time()},
            ).first()
            if first is None:
                return False, None
            return True, handler(conn)


def _record(row: Row[Any]) -> OutboxRecord:
    m = row._mapping
    return OutboxRecord(
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


#: Status values to members, without an Enum call per row.
_STATUS = {s.value: s for s in OutboxStatus}


def _claimed(row: Sequence[Any]) -> OutboxRecord:
    """A row of ``claimed_events`` as a record. That statement selects ``OutboxRecord``'s fields
    in their order (a test checks it), so the record is built by position: the cheapest way,
    for the thousand records of a relay round."""
    id_, event_id, topic, key, seq, event_type, payload, headers, status, attempts, at, error = row
    return OutboxRecord(
        id_,
        event_id,
        topic,
        key,
        seq,
        event_type,
        payload,
        StoredHeaders(headers),
        _STATUS[status],
        attempts,
        at,
        error,
    )
