"""The saga and outbox repository, shared by every dialect (DESIGN.md sections 3 and 4).

Methods come in pairs: a sync ``_name`` that runs one short transaction, and the async ``name``
that runs it in a worker thread under this storage's own limiter (never anyio's shared default).
Dialect subclasses supply engine setup, the database clock, the upsert and claim locking.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import anyio
from anyio.lowlevel import RunVar
from sqlalchemy import Connection, Engine, Select, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Row
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ColumnElement

from saga_core._json import dumps, loads
from saga_core.errors import ErrorRecord, LeaseLost, SagaConflict, SagaNotFound, StorageError
from saga_core.events import OutboxEvent
from saga_core.records import (
    ClaimedKey,
    Fence,
    NewSaga,
    OutboxRecord,
    SagaState,
    SagaWrite,
    StepState,
)
from saga_core.states import OutboxStatus, SagaStatus, StepStatus
from saga_storage.migrations import MIGRATIONS, apply_pending
from saga_storage.schema import Tables, build_tables
from saga_storage.statements import Statements

T = TypeVar("T")


def _error(type_: str | None, message: str | None) -> ErrorRecord | None:
    return None if type_ is None else ErrorRecord(type_, message or "")


def _step_state(row: Row[Any]) -> StepState:
    m = row._mapping
    return StepState(
        name=m["name"],
        status=StepStatus(m["status"]),
        outcome=m["outcome"],
        attempts=m["attempts"],
        result=loads(m["result"]),
        error=_error(m["error_type"], m["error_message"]),
        crashes=m["crashes"],
        compensation_attempts=m["compensation_attempts"],
        compensation_error=_error(m["compensation_error_type"], m["compensation_error_message"]),
        started_at=m["started_at"],
        finished_at=m["finished_at"],
    )


def _saga_state(row: Row[Any], steps: Sequence[Row[Any]]) -> SagaState:
    m = row._mapping
    return SagaState(
        saga_id=m["id"],
        saga_type=m["saga_type"],
        definition_hash=m["definition_hash"],
        status=SagaStatus(m["status"]),
        input=loads(m["input"]),
        steps={s._mapping["name"]: _step_state(s) for s in steps},
        reason=m["reason"],
        failed_step=m["failed_step"],
        error=_error(m["error_type"], m["error_message"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        lease_owner=m["lease_owner"],
        lease_epoch=m["lease_epoch"],
        lease_until=m["lease_until"],
        wake_at=m["wake_at"],
        note=m["note"],
    )


def _step_params(saga_id: str, s: StepState) -> dict[str, Any]:
    return {
        "b_id": saga_id,
        "b_name": s.name,
        "b_status": s.status.value,
        "b_outcome": s.outcome,
        "b_attempts": s.attempts,
        "b_result": None if s.result is None else dumps(s.result),
        "b_error_type": s.error.type if s.error else None,
        "b_error_message": s.error.message if s.error else None,
        "b_crashes": s.crashes,
        "b_compensation_attempts": s.compensation_attempts,
        "b_compensation_error_type": s.compensation_error.type if s.compensation_error else None,
        "b_compensation_error_message": (
            s.compensation_error.message if s.compensation_error else None
        ),
        "b_started_at": s.started_at,
        "b_finished_at": s.finished_at,
    }


class _AlreadyApplied(Exception):
    """A retried write whose first try had committed (its event ids exist): nothing to redo."""


class SqlStorage:
    """Saga and outbox storage on a SQLAlchemy engine. Create it with ``create_storage(url)``.

    ``engine`` is public: application code opens its own transactions on it and calls
    :meth:`append_outbox` inside them.
    """

    dialect: ClassVar[str] = ""

    def __init__(
        self,
        engine: Engine,
        *,
        prefix: str = "saga_",
        schema: str | None = None,
        max_threads: int = 8,
    ) -> None:
        if not prefix.replace("_", "").isalnum():
            raise ValueError(f"table prefix must be letters, digits and '_', got {prefix!r}")
        self.engine = engine
        self.tables: Tables = build_tables(prefix, schema)
        self.sql = Statements(
            self.tables, now=self._now(), upsert_insert=self._insert, lock_claim=self._lock_claim
        )
        self._max_threads = max_threads
        # One limiter per event loop: the same storage may serve several loops in turn (a sync
        # facade's loop thread, then an anyio.run of a script), and limiters are loop-bound.
        self._limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"saga_storage_{id(self)}")
        # Lease renewals never wait behind a busy limiter either.
        self._lease_limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"saga_leases_{id(self)}")

    # --- dialect hooks ---------------------------------------------------------------------
    def _now(self) -> ColumnElement[float]:
        """The database clock as UTC epoch seconds."""
        raise NotImplementedError

    def _insert(self, table: Any) -> Insert:
        """The dialect's INSERT supporting ON CONFLICT."""
        raise NotImplementedError

    def _lock_claim(self, stmt: Select[Any]) -> Select[Any]:
        """Lock claimable rows so concurrent relays skip each other's."""
        return stmt

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction."""
        with self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction."""
        with self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def _migration_lock(self, conn: Connection) -> Iterator[None]:
        """Serialise migrations across processes (the caller's transaction holds the lock)."""
        yield

    # --- plumbing --------------------------------------------------------------------------
    def _set_statement_timeout(self, conn: Connection, seconds: float) -> None:
        """Bound the statements of a transactional step (where the database can)."""

    def _map_error(self, exc: sa_exc.DBAPIError) -> Exception:
        """Turn a driver failure into our own error type (no URL or secret in the message)."""
        return StorageError(f"{self.dialect} storage failed: {type(exc.orig).__name__}: {exc.orig}")

    async def _run(self, fn: Callable[..., T], *args: Any, lease: bool = False) -> T:
        var = self._lease_limiter if lease else self._limiter
        try:
            limiter = var.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(1 if lease else self._max_threads)
            var.set(limiter)
        return await anyio.to_thread.run_sync(
            functools.partial(self._guarded, fn, *args), limiter=limiter
        )

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except sa_exc.IntegrityError:
            raise
        except sa_exc.DBAPIError as exc:
            raise self._map_error(exc) from exc

    # --- schema ----------------------------------------------------------------------------
    def migrate(self) -> int:
        """Create or upgrade the schema; returns the number of migrations applied.

        Each migration runs in its own transaction; concurrent starters are serialised.
        """
        applied = 0
        with self._write() as conn, self._migration_lock(conn):
            self.tables.metadata.create_all(conn, tables=[self.tables.version])
        for migration in MIGRATIONS:
            with self._write() as conn, self._migration_lock(conn):
                applied += apply_pending(conn, self.tables, migration)
        return applied

    # --- sagas -----------------------------------------------------------------------------
    async def create_saga(
        self, new: NewSaga, *, lease_owner: str | None, lease_seconds: float
    ) -> tuple[SagaState, Fence | None]:
        """Insert the saga and its steps (see ``SagaStore.create_saga``)."""
        return await self._run(self._create_saga, new, lease_owner, lease_seconds)

    def _create_saga(
        self, new: NewSaga, owner: str | None, lease_seconds: float
    ) -> tuple[SagaState, Fence | None]:
        input_json = dumps(new.input)
        try:
            with self._write() as conn:
                found = self._existing(conn, new, input_json)
                if found is not None:
                    return found, None
                now = time.time()
                status = SagaStatus.RUNNING if owner else SagaStatus.PENDING
                epoch = 1 if owner else 0
                conn.execute(
                    self.sql.insert_saga,
                    {
                        "b_id": new.saga_id,
                        "b_saga_type": new.saga_type,
                        "b_definition_hash": new.definition_hash,
                        "b_status": status.value,
                        "b_input": input_json,
                        "b_owner": owner,
                        "b_epoch": epoch,
                        "b_lease": lease_seconds if owner else None,
                        "b_ts": now,
                    },
                )
                conn.execute(
                    self.sql.insert_step,
                    [
                        {"b_id": new.saga_id, "b_name": name, "b_position": i}
                        for i, name in enumerate(new.step_names)
                    ],
                )
        except sa_exc.IntegrityError:
            # Another process inserted the same id between our read and our insert.
            with self._read() as conn:
                found = self._existing(conn, new, input_json)
            if found is None:
                raise
            return found, None
        state = SagaState(
            saga_id=new.saga_id,
            saga_type=new.saga_type,
            definition_hash=new.definition_hash,
            status=status,
            input=loads(input_json),
            steps={n: StepState(n) for n in new.step_names},
            created_at=now,
            updated_at=now,
            lease_owner=owner,
            lease_epoch=epoch,
        )
        return state, (Fence(new.saga_id, owner, epoch) if owner else None)

    def _existing(self, conn: Connection, new: NewSaga, input_json: str) -> SagaState | None:
        row = conn.execute(self.sql.select_saga, {"b_id": new.saga_id}).first()
        if row is None:
            return None
        m = row._mapping
        if m["saga_type"] != new.saga_type:
            raise SagaConflict(new.saga_id, f"type {m['saga_type']!r}, not {new.saga_type!r}")
        if m["input"] != input_json:
            raise SagaConflict(new.saga_id, "a different input")
        steps = conn.execute(self.sql.select_steps, {"b_id": new.saga_id}).all()
        return _saga_state(row, steps)

    async def load_saga(self, saga_id: str) -> SagaState:
        """The saga and its steps; ``SagaNotFound`` if absent."""
        return await self._run(self._load_saga, saga_id)

    def _load_saga(self, saga_id: str) -> SagaState:
        with self._read() as conn:
            row = conn.execute(self.sql.select_saga, {"b_id": saga_id}).first()
            if row is None:
                raise SagaNotFound(saga_id)
            steps = conn.execute(self.sql.select_steps, {"b_id": saga_id}).all()
        return _saga_state(row, steps)

    async def write(self, fence: Fence, change: SagaWrite) -> None:
        """Apply ``change`` after the fenced update, in one transaction."""
        await self._run(self._write_change, fence, change)

    def _write_change(self, fence: Fence, change: SagaWrite) -> None:
        try:
            with self._write() as conn:
                self._apply(conn, fence, change)
        except _AlreadyApplied:
            pass

    async def write_transactional(
        self,
        fence: Fence,
        action: Callable[[Any], T],
        finish: Callable[[T], SagaWrite],
        timeout: float | None = None,
    ) -> T:
        """Run ``action(conn)`` then ``finish(result)``'s change in the same transaction."""
        return await self._run(self._write_transactional, fence, action, finish, timeout)

    def _write_transactional(
        self,
        fence: Fence,
        action: Callable[[Any], T],
        finish: Callable[[T], SagaWrite],
        timeout: float | None,
    ) -> T:
        with self._write() as conn:
            if timeout is not None:
                self._set_statement_timeout(conn, timeout)
            result = action(conn)
            self._apply(conn, fence, finish(result))
        return result

    def _apply(self, conn: Connection, fence: Fence, change: SagaWrite) -> None:
        now = time.time()
        fence_params = {
            "b_id": fence.saga_id,
            "b_owner": fence.owner,
            "b_epoch": fence.epoch,
            "b_ts": now,
        }
        if change.wake_in is not None:
            res = conn.execute(
                self.sql.fence_suspend, {**fence_params, "b_wake_in": change.wake_in}
            )
        elif change.status is None:
            res = conn.execute(self.sql.fence_touch, fence_params)
        else:
            err = change.error
            res = conn.execute(
                self.sql.fence_finish if change.release_lease else self.sql.fence_status,
                {
                    **fence_params,
                    "b_status": change.status.value,
                    "b_reason": change.reason,
                    "b_failed_step": change.failed_step,
                    "b_error_type": err.type if err else None,
                    "b_error_message": err.message if err else None,
                    "b_note": change.note,
                },
            )
        if res.rowcount != 1:
            raise LeaseLost(fence.saga_id)
        if change.steps:
            conn.execute(
                self.sql.update_step, [_step_params(fence.saga_id, s) for s in change.steps]
            )
        if change.events:
            # A retried write whose first attempt committed has its events already: all or
            # nothing, so the whole change is there and must not be applied twice.
            first = change.events[0].event_id
            if conn.execute(self.sql.event_exists, {"b_event_id": first}).first() is not None:
                raise _AlreadyApplied
            for event in change.events:
                self._append(conn, event, now)

    async def claim_saga(self, saga_id: str, owner: str, lease_seconds: float) -> Fence | None:
        """Lease a saga that nobody holds (or whose lease expired); ``None`` if someone does."""
        return await self._run(self._claim_saga, saga_id, owner, lease_seconds)

    def _claim_saga(self, saga_id: str, owner: str, lease_seconds: float) -> Fence | None:
        with self._write() as conn:
            epoch = conn.execute(
                self.sql.claim_saga,
                {"b_id": saga_id, "b_owner": owner, "b_lease": lease_seconds, "b_ts": time.time()},
            ).scalar_one_or_none()
        return None if epoch is None else Fence(saga_id, owner, int(epoch))

    async def renew_leases(
        self, owner: str, fences: Sequence[Fence], lease_seconds: float
    ) -> set[str]:
        """Extend the leases of ``fences``; returns the saga ids still held (same epoch)."""
        if not fences:
            return set()
        return await self._run(self._renew_leases, owner, fences, lease_seconds, lease=True)

    def _renew_leases(self, owner: str, fences: Sequence[Fence], lease_seconds: float) -> set[str]:
        with self._lease_write() as conn:
            rows = conn.execute(
                self.sql.renew_leases,
                {"b_owner": owner, "b_ids": [f.saga_id for f in fences], "b_lease": lease_seconds},
            ).all()
        epochs = {f.saga_id: f.epoch for f in fences}
        return {sid for sid, epoch in rows if epochs.get(sid) == epoch}

    @contextlib.contextmanager
    def _lease_write(self) -> Iterator[Connection]:
        """A write transaction for lease renewals (a dedicated connection where it matters)."""
        with self._write() as conn:
            yield conn

    async def claim_sagas(
        self,
        owner: str,
        known: Mapping[str, Sequence[str]],
        *,
        limit: int,
        lease_seconds: float,
    ) -> list[Fence]:
        """Lease up to ``limit`` sagas that need a worker: ``PENDING``, lease expired, or
        ``wake_at`` passed; only of ``known`` types with one of their definition hashes.

        Sagas of a known type but another definition are left alone and noted.
        """
        return await self._run(self._claim_sagas, owner, known, limit, lease_seconds)

    def _claim_sagas(
        self, owner: str, known: Mapping[str, Sequence[str]], limit: int, lease_seconds: float
    ) -> list[Fence]:
        pairs = [(t, h) for t, hashes in known.items() for h in hashes]
        if not pairs or limit < 1:
            return []
        with self._write() as conn:
            ids = list(
                conn.execute(
                    self.sql.claimable_sagas, {"b_known": pairs, "b_limit": limit}
                ).scalars()
            )
            if not ids:
                return []
            rows = conn.execute(
                self.sql.claim_sagas,
                {"b_ids": ids, "b_owner": owner, "b_lease": lease_seconds, "b_ts": time.time()},
            ).all()
        return [Fence(sid, owner, int(epoch)) for sid, epoch in rows]

    async def note_unknown_versions(self, owner: str, known: Mapping[str, Sequence[str]]) -> int:
        """Mark unsettled sagas of ``known`` types whose definition hash this worker lacks."""
        return await self._run(self._note_unknown_versions, owner, known)

    def _note_unknown_versions(self, owner: str, known: Mapping[str, Sequence[str]]) -> int:
        total = 0
        with self._write() as conn:
            for saga_type, hashes in known.items():
                note = (
                    f"definition differs from the code of worker {owner} "
                    f"(it has {', '.join(hashes)}); waiting for a worker with this definition"
                )
                total += conn.execute(
                    self.sql.note_unknown_version,
                    {"b_saga_type": saga_type, "b_hashes": list(hashes), "b_note": note},
                ).rowcount
        return total

    async def release(self, fence: Fence) -> None:
        """Drop the lease if we still hold it (no error if we do not)."""
        await self._run(self._release, fence)

    def _release(self, fence: Fence) -> None:
        with self._write() as conn:
            conn.execute(
                self.sql.fence_release,
                {
                    "b_id": fence.saga_id,
                    "b_owner": fence.owner,
                    "b_epoch": fence.epoch,
                    "b_ts": time.time(),
                },
            )

    async def list_sagas(
        self,
        *,
        status: SagaStatus | None = None,
        saga_type: str | None = None,
        older_than: float | None = None,
        limit: int = 100,
    ) -> list[SagaState]:
        """Sagas newest first (without their steps), filtered."""
        return await self._run(self._list_sagas, status, saga_type, older_than, limit)

    def _list_sagas(
        self, status: SagaStatus | None, saga_type: str | None, older_than: float | None, limit: int
    ) -> list[SagaState]:
        sagas = self.tables.sagas
        stmt = select(sagas).order_by(sagas.c.created_at.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(sagas.c.status == status.value)
        if saga_type is not None:
            stmt = stmt.where(sagas.c.saga_type == saga_type)
        if older_than is not None:
            stmt = stmt.where(sagas.c.created_at <= time.time() - older_than)
        with self._read() as conn:
            return [_saga_state(r, ()) for r in conn.execute(stmt).all()]

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

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    async def aclose(self) -> None:
        """Close every pooled connection (async form of :meth:`dispose`)."""
        await self._run(self.dispose)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.engine.url.render_as_string(hide_password=True)!r})"
