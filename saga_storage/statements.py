"""Every SQL statement the repository runs, named and built once per storage.

Statements are SQLAlchemy Core expressions with bind parameters (prefixed ``b_`` so they never
collide with column names); each dialect compiles them to its own SQL. Dialect-specific pieces
(the upsert, the database clock, row locking for claims) come from the storage subclass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Float,
    Select,
    String,
    and_,
    bindparam,
    case,
    cast,
    exists,
    false,
    func,
    or_,
    select,
    true,
    tuple_,
    update,
)

from saga_storage.schema import Tables


def b(name: str) -> Any:
    """A bind parameter named ``b_<name>``."""
    return bindparam(f"b_{name}")


class Statements:
    """The named statements of one storage (one table prefix, one dialect)."""

    def __init__(
        self,
        t: Tables,
        *,
        now: ColumnElement[float],
        upsert_insert: Callable[[Any], Any],
        lock_claim: Callable[[Select[Any]], Select[Any]],
        in_list: Callable[[Any, str], ColumnElement[bool]],
        lock_in_order: Callable[[Select[Any]], Select[Any]] = lambda stmt: stmt,
    ) -> None:
        sagas, steps, outbox, okey = t.sagas, t.steps, t.outbox, t.outbox_key

        # --- sagas -----------------------------------------------------------------------------
        self.select_saga = select(sagas).where(sagas.c.id == b("id"))
        self.select_steps = (
            select(steps).where(steps.c.saga_id == b("id")).order_by(steps.c.position)
        )
        # Creation in batches: one statement inserts every new saga; an id that exists already
        # is left alone (and read back by its creator), instead of failing the batch.
        self.insert_sagas = (
            upsert_insert(sagas)
            .values(
                id=b("id"),
                saga_type=b("saga_type"),
                definition_hash=b("definition_hash"),
                status=b("status"),
                input=b("input"),
                lease_owner=b("owner"),
                lease_epoch=b("epoch"),
                lease_until=now + b("lease"),
                version=0,
                created_at=b("ts"),
                updated_at=b("ts"),
            )
            .on_conflict_do_nothing(index_elements=[sagas.c.id])
            .returning(sagas.c.id)
        )
        self.insert_step = steps.insert().values(
            saga_id=b("id"),
            name=b("name"),
            position=b("position"),
            status=b("status"),
            attempts=b("attempts"),
            started_at=b("started_at"),
        )
        fenced = and_(
            sagas.c.id == b("id"),
            sagas.c.lease_owner == b("owner"),
            sagas.c.lease_epoch == b("epoch"),
        )
        # The fenced update: every write for a saga starts with it (DESIGN.md section 3). One
        # statement for every kind of write, so the writes of many sagas go to the database as
        # one batch (executemany): with ``b_set_status`` it records a status (and the error
        # columns); ``b_release`` drops the lease (a final status: one transaction fewer per
        # saga); ``b_wake_in`` with ``b_release`` suspends until then (a long retry wait holds
        # no lease; a worker claims the saga at wake_at). With ``b_first_event``, it matches
        # nothing if that event is stored already (a retried write whose first try committed),
        # which costs a query only when the fence fails, instead of one before every write.
        set_status = bindparam("b_set_status", type_=Boolean)
        release = bindparam("b_release", type_=Boolean)
        # Cast: PostgreSQL cannot infer the type of a parameter that is only tested for NULL.
        wake_in = cast(bindparam("b_wake_in", type_=Float), Float)
        first_event = bindparam("b_first_event", type_=String)

        def status_col(name: str) -> Any:
            col = sagas.c[name]
            return case((set_status, bindparam(f"b_{name}", type_=col.type)), else_=col)

        self.fence_write = (
            update(sagas)
            .where(
                fenced,
                or_(
                    first_event.is_(None),
                    ~exists().where(t.outbox.c.event_id == first_event),
                ),
            )
            .values(
                version=sagas.c.version + 1,
                updated_at=b("ts"),
                **{
                    name: status_col(name)
                    for name in (
                        "status",
                        "reason",
                        "failed_step",
                        "error_type",
                        "error_message",
                        "note",
                    )
                },
                lease_owner=case((release, None), else_=sagas.c.lease_owner),
                lease_until=case((release, None), else_=sagas.c.lease_until),
                wake_at=case(
                    (wake_in.is_not(None), now + wake_in), (release, None), else_=sagas.c.wake_at
                ),
            )
            .returning(sagas.c.id)
        )
        self.fence_holds = select(sagas.c.id).where(fenced)
        self.fence_release = (
            update(sagas)
            .where(fenced)
            .values(lease_owner=None, lease_until=None, updated_at=b("ts"))
        )
        # Take a saga nobody holds (or whose lease expired); the epoch bump fences the old owner.
        self.claim_saga = (
            update(sagas)
            .where(
                sagas.c.id == b("id"),
                sagas.c.status.not_in(("COMPLETED", "COMPENSATED")),
                or_(sagas.c.lease_owner.is_(None), sagas.c.lease_until < now),
            )
            .values(
                lease_owner=b("owner"),
                lease_epoch=sagas.c.lease_epoch + 1,
                lease_until=now + b("lease"),
                updated_at=b("ts"),
            )
            .returning(sagas.c.lease_epoch)
        )
        # Renewal of every lease a worker holds, in one statement; what it does not return
        # was lost (another worker bumped the epoch).
        # Its rows are locked in saga id order first, as a coalesced batch of writes locks them:
        # a plain UPDATE ... WHERE id IN locks in heap order (a seq or bitmap heap scan), so a
        # renewal of many sagas would deadlock with a batch holding some of them.
        renewing = lock_in_order(
            select(sagas.c.id).where(
                sagas.c.lease_owner == b("owner"),
                in_list(sagas.c.id, "b_ids"),
            )
        )
        self.renew_leases = (
            update(sagas)
            .where(sagas.c.id.in_(renewing.scalar_subquery()))
            .values(lease_until=now + b("lease"))
            .returning(sagas.c.id, sagas.c.lease_epoch)
        )
        # What recovery may take: pending sagas, expired leases, and waits whose time came;
        # only of the (type, definition hash) pairs the worker knows.
        claimable = and_(
            tuple_(sagas.c.saga_type, sagas.c.definition_hash).in_(
                bindparam("b_known", expanding=True)
            ),
            sagas.c.status.in_(("PENDING", "RUNNING", "COMPENSATING")),
            or_(
                and_(sagas.c.lease_owner.is_not(None), sagas.c.lease_until < now),
                and_(
                    sagas.c.lease_owner.is_(None),
                    or_(sagas.c.wake_at.is_(None), sagas.c.wake_at <= now),
                ),
            ),
        )
        self.claimable_sagas = lock_claim(
            select(sagas.c.id).where(claimable).order_by(sagas.c.created_at).limit(b("limit"))
        )
        self.claim_sagas = (
            update(sagas)
            .where(in_list(sagas.c.id, "b_ids"))
            .values(
                lease_owner=b("owner"),
                lease_epoch=sagas.c.lease_epoch + 1,
                lease_until=now + b("lease"),
                wake_at=None,
                updated_at=b("ts"),
            )
            .returning(sagas.c.id, sagas.c.lease_epoch)
        )
        # Sagas of a known type stored by another definition: say why nobody advances them.
        self.note_unknown_version = (
            update(sagas)
            .where(
                sagas.c.saga_type == b("saga_type"),
                sagas.c.definition_hash.not_in(bindparam("b_hashes", expanding=True)),
                sagas.c.status.in_(("PENDING", "RUNNING", "COMPENSATING")),
                or_(sagas.c.note.is_(None), sagas.c.note != b("note")),
            )
            .values(note=b("note"))
        )
        self.set_note = update(sagas).where(sagas.c.id == b("id")).values(note=b("note"))
        self.update_step = (
            update(steps)
            .where(steps.c.saga_id == b("id"), steps.c.name == b("name"))
            .values(
                status=b("status"),
                outcome=b("outcome"),
                attempts=b("attempts"),
                result=b("result"),
                error_type=b("error_type"),
                error_message=b("error_message"),
                crashes=b("crashes"),
                compensation_attempts=b("compensation_attempts"),
                compensation_error_type=b("compensation_error_type"),
                compensation_error_message=b("compensation_error_message"),
                started_at=b("started_at"),
                finished_at=b("finished_at"),
            )
        )

        # --- outbox: append --------------------------------------------------------------------
        # Taking a key's next ``n`` sequence numbers in the writer's transaction locks the key
        # row, so a key's sequence is gap-free and equal to commit order (DESIGN.md section 4).
        # Executed for several keys in one statement, each key once (a row cannot be upserted
        # twice by one statement).
        upsert_n = upsert_insert(okey).values(
            key=b("key"), last_seq=b("n"), sent_seq=0, blocked=False
        )
        self.next_seqs = upsert_n.on_conflict_do_update(
            index_elements=[okey.c.key],
            set_={"last_seq": okey.c.last_seq + upsert_n.excluded.last_seq},
        ).returning(okey.c.key, okey.c.last_seq)
        self.insert_events = outbox.insert().values(
            event_id=b("event_id"),
            saga_id=b("saga_id"),
            topic=b("topic"),
            key=b("key"),
            seq=b("seq"),
            event_type=b("event_type"),
            payload=b("payload"),
            headers=b("headers"),
            status="PENDING",
            attempts=0,
            created_at=b("ts"),
        )
        self.insert_events_ids = self.insert_events.returning(outbox.c.event_id, outbox.c.id)
        self.event_exists = select(outbox.c.id).where(outbox.c.event_id == b("event_id"))
        # Optimistic publish: in the writer's transaction (which holds the key rows since the
        # sequence upsert), claim each key that nobody holds and whose next event is the first
        # of this transaction's ``n`` events of it: ``last_seq`` already counts them, so that
        # is ``sent_seq = last_seq - n``. One statement for every key appended with ``n`` events
        # (a saga step appends one per key), instead of one per key.
        self.claim_new_keys = (
            update(okey)
            .where(
                in_list(okey.c.key, "b_keys"),
                okey.c.sent_seq == okey.c.last_seq - b("n"),
                okey.c.blocked == false(),
                or_(okey.c.claim_token.is_(None), okey.c.claimed_until < now),
                or_(okey.c.next_attempt_at.is_(None), okey.c.next_attempt_at <= now),
            )
            .values(claim_token=b("token"), claimed_until=now + b("claim_seconds"))
            .returning(okey.c.key)
        )
        self.claim_alive = select(okey.c.key).where(
            okey.c.key == b("key"), okey.c.claim_token == b("token")
        )

        # --- outbox: relay ---------------------------------------------------------------------
        self.claimable_keys = lock_claim(
            select(okey.c.key)
            .where(
                okey.c.sent_seq < okey.c.last_seq,
                okey.c.blocked == false(),
                or_(okey.c.claimed_until.is_(None), okey.c.claimed_until < now),
                or_(okey.c.next_attempt_at.is_(None), okey.c.next_attempt_at <= now),
            )
            .limit(b("limit"))
        )
        self.claim_keys = (
            update(okey)
            .where(in_list(okey.c.key, "b_keys"))
            .values(claim_token=b("token"), claimed_until=now + b("claim_seconds"))
        )
        # The columns of an ``OutboxRecord``, in its field order: a claimed row becomes a record
        # by position (the relay builds one per event). Not saga_id or sent_at. Its callers
        # hold the key rows (locked and found carrying their claim), so keys are enough.
        self.claimed_events = (
            select(
                outbox.c.id,
                outbox.c.event_id,
                outbox.c.topic,
                outbox.c.key,
                outbox.c.seq,
                outbox.c.event_type,
                outbox.c.payload,
                outbox.c.headers,
                outbox.c.status,
                outbox.c.attempts,
                outbox.c.created_at,
                outbox.c.last_error,
            )
            .join(okey, okey.c.key == outbox.c.key)
            .where(
                in_list(okey.c.key, "b_keys"),
                outbox.c.seq > okey.c.sent_seq,
                outbox.c.seq <= okey.c.sent_seq + b("per_key"),
            )
            .order_by(outbox.c.key, outbox.c.seq)
        )
        self.finish_key = (
            update(okey)
            .where(okey.c.key == b("key"), okey.c.claim_token == b("token"))
            .values(
                sent_seq=b("sent_seq"),
                claim_token=None,
                claimed_until=None,
                next_attempt_at=now + b("retry_in"),
            )
        )
        # Completing publishes in one transaction (a relay round, or many optimistic publishes
        # at once): lock the key rows, skipping (SKIP LOCKED) those a writer holds, and read
        # whose claim each carries. The completer then never waits for a lock while it holds
        # others, so it cannot deadlock with a writer that appends to several keys; a key
        # skipped, or claimed by someone else now, is completed on its own afterwards.
        in_keys = in_list(okey.c.key, "b_keys")
        self.lock_keys = lock_claim(select(okey.c.key, okey.c.claim_token).where(in_keys))
        # Then, set-based (a statement for many keys rather than one per key), on keys locked
        # above and found carrying the completer's claims: mark sent the ``sent`` events of
        # each key that follow its ``sent_seq``, then advance the keys and release them (or
        # keep them, for the optimistic publisher to follow up with what was committed since).
        # Relative to ``sent_seq``: nobody but the claim's holder moves it while the key is
        # claimed, so it is still where the claim started.
        self.mark_sent_keys = (
            update(outbox)
            .where(
                outbox.c.key == okey.c.key,
                in_keys,
                outbox.c.seq > okey.c.sent_seq,
                outbox.c.seq <= okey.c.sent_seq + b("sent"),
            )
            .values(status="SENT", sent_at=b("ts"))
        )
        self.finish_keys = (
            update(okey)
            .where(in_keys)
            .values(
                sent_seq=okey.c.sent_seq + b("sent"),
                claim_token=None,
                claimed_until=None,
                next_attempt_at=now,
            )
        )
        self.advance_keys = (
            update(okey)
            .where(in_keys)
            .values(
                sent_seq=okey.c.sent_seq + b("sent"),
                claimed_until=now + b("claim_seconds"),
            )
        )
        self.unclaim_keys = update(okey).where(in_keys).values(claim_token=None, claimed_until=None)
        # One key at a time, checking the claim: what was left out of the set-based path.
        self.advance_claimed = (
            update(okey)
            .where(okey.c.key == b("key"), okey.c.claim_token == b("token"))
            .values(sent_seq=b("sent_seq"), claimed_until=now + b("claim_seconds"))
        )
        self.unclaim_key = (
            update(okey)
            .where(okey.c.key == b("key"), okey.c.claim_token == b("token"))
            .values(claim_token=None, claimed_until=None)
        )
        self.block_key = update(okey).where(okey.c.key == b("key")).values(blocked=True)
        self.mark_sent = (
            update(outbox)
            .where(
                outbox.c.key == b("key"), outbox.c.seq > b("from_seq"), outbox.c.seq <= b("to_seq")
            )
            .values(status="SENT", sent_at=b("ts"))
        )
        self.fail_event = (
            update(outbox)
            .where(outbox.c.id == b("id"))
            .values(attempts=outbox.c.attempts + 1, last_error=b("error"))
            .returning(outbox.c.attempts)
        )
        self.kill_event = update(outbox).where(outbox.c.id == b("id")).values(status="DEAD")

        # --- outbox: operations ----------------------------------------------------------------
        self.count_by_status = select(outbox.c.status, func.count()).group_by(outbox.c.status)
        # Unsent events are found through their keys (the key table's partial index of keys
        # with unsent events): a key's events after its sent_seq are exactly its unsent ones,
        # and a dead event is the next one of a blocked key. The outbox itself has no index
        # on its status (sending is an update that touches no index: migration 2).
        unsent_keys = okey.c.sent_seq < okey.c.last_seq
        self.oldest_pending = (
            select(func.min(outbox.c.created_at))
            .select_from(okey)
            .join(outbox, and_(outbox.c.key == okey.c.key, outbox.c.seq > okey.c.sent_seq))
            .where(unsent_keys, outbox.c.status == "PENDING")
        )
        at_dead_event = and_(outbox.c.key == okey.c.key, outbox.c.seq == okey.c.sent_seq + 1)
        self.count_blocked = select(func.count()).select_from(okey).where(okey.c.blocked == true())
        self.count_claimed = (
            select(func.count()).select_from(okey).where(okey.c.claimed_until > now)
        )
        self.list_dead = (
            select(outbox)
            .join(okey, at_dead_event)
            .where(unsent_keys, okey.c.blocked == true(), outbox.c.status == "DEAD")
            .order_by(outbox.c.id)
            .limit(b("limit"))
        )
        self.dead_of_key = (
            select(outbox)
            .join(okey, at_dead_event)
            .where(okey.c.key == b("key"), outbox.c.status == "DEAD")
        )
        self.dead_by_event = select(outbox).where(
            outbox.c.event_id == b("event_id"), outbox.c.status == "DEAD"
        )
        # Replay: the dead event gets fresh attempts and the key flows again from it.
        self.revive_event = (
            update(outbox)
            .where(outbox.c.id == b("id"), outbox.c.status == "DEAD")
            .values(status="PENDING", attempts=0)
        )
        self.unblock_key = (
            update(okey)
            .where(okey.c.key == b("key"))
            .values(blocked=False, next_attempt_at=None, claim_token=None, claimed_until=None)
        )
        # Skip: the only way past a dead event; it is marked sent without being published.
        self.skip_event = (
            update(outbox)
            .where(outbox.c.id == b("id"), outbox.c.status == "DEAD")
            .values(status="SENT", sent_at=b("ts"), last_error=b("note"))
        )
        self.advance_key = (
            update(okey)
            .where(okey.c.key == b("key"), okey.c.sent_seq == b("seq") - 1)
            .values(sent_seq=b("seq"), blocked=False, next_attempt_at=None)
        )
        # Pruning walks the outbox in id order, a window at a time (a bounded delete never
        # holds locks for long), and stops at events created after the cutoff: an event is
        # sent after it is created, so none after them can be old enough.
        self.prune_window = (
            select(outbox.c.id, outbox.c.status, outbox.c.sent_at, outbox.c.created_at)
            .where(outbox.c.id > b("after"))
            .order_by(outbox.c.id)
            .limit(b("limit"))
        )
        self.delete_events = outbox.delete().where(in_list(outbox.c.id, "b_ids"))

        # --- inbox -----------------------------------------------------------------------------
        # The first insert of (consumer, message id) wins; a concurrent duplicate waits for it
        # on the primary key and then inserts nothing.
        self.inbox_insert = (
            upsert_insert(t.inbox)
            .values(consumer=b("consumer"), message_id=b("message_id"), received_at=b("ts"))
            .on_conflict_do_nothing(index_elements=[t.inbox.c.consumer, t.inbox.c.message_id])
            .returning(t.inbox.c.message_id)
        )
