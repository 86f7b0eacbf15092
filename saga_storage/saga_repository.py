"""The saga half of the repository: sagas and steps, fenced writes, leases and claims
(DESIGN.md section 3)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, select
from sqlalchemy.engine import Row

from saga_core._json import dumps, loads
from saga_core.errors import ErrorRecord, LeaseLost, SagaConflict, SagaNotFound
from saga_core.events import OutboxEvent
from saga_core.records import (
    ClaimedKey,
    Fence,
    NewSaga,
    SagaState,
    SagaWrite,
    StepState,
)
from saga_core.states import SagaStatus, StepStatus
from saga_storage.coalesce import Pending
from saga_storage.outbox_repository import OutboxRepository

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


#: Marks a queued creation among the queued writes of the coalescer.
_CREATE = object()


class _AlreadyApplied(Exception):
    """A retried write whose first try had committed (its event ids exist): nothing to redo."""


def _fence_params(fence: Fence, change: SagaWrite, now: float) -> dict[str, Any]:
    """The parameters of ``Statements.fence_write`` for one write."""
    err = change.error
    suspend = change.wake_in is not None
    return {
        "b_id": fence.saga_id,
        "b_owner": fence.owner,
        "b_epoch": fence.epoch,
        "b_ts": now,
        "b_first_event": change.events[0].event_id if change.events else None,
        "b_set_status": change.status is not None and not suspend,
        "b_release": suspend or (change.status is not None and change.release_lease),
        "b_wake_in": change.wake_in,
        "b_status": change.status.value if change.status is not None else None,
        "b_reason": change.reason,
        "b_failed_step": change.failed_step,
        "b_error_type": err.type if err else None,
        "b_error_message": err.message if err else None,
        "b_note": change.note,
    }


def _saga_id_of(item: Pending[Any]) -> str:
    """The saga a queued creation ``(_CREATE, new, ...)`` or write ``(fence, ...)`` is for."""
    target = item.args[1] if item.args[0] is _CREATE else item.args[0]
    return str(target.saga_id)


class SagaRepository(OutboxRepository):
    """Saga and step rows."""

    # --- sagas -----------------------------------------------------------------------------
    # ``create_saga`` and ``write`` hand back the coroutine that does the work instead of
    # awaiting it in one of their own: one frame less under each of thousands of waiting sagas
    # (the collector walks them all, and every wake-up passes through each frame).
    def create_saga(
        self, new: NewSaga, *, lease_owner: str | None, lease_seconds: float
    ) -> Coroutine[Any, Any, tuple[SagaState, Fence | None]]:
        """Insert the saga and its steps (see ``SagaStore.create_saga``)."""
        if not self.coalesce:
            return self._run(self._create_saga, new, lease_owner, lease_seconds)
        # Creations share the transactions of concurrent saga writes (saga_storage.coalesce).
        return self._writes.submit(_CREATE, new, lease_owner, lease_seconds)

    def _create_saga(
        self, new: NewSaga, owner: str | None, lease_seconds: float
    ) -> tuple[SagaState, Fence | None]:
        with self._write() as conn:
            (outcome,) = self._create_in(conn, [(new, owner, lease_seconds)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _create_in(
        self, conn: Connection, batch: Sequence[tuple[NewSaga, str | None, float]]
    ) -> list[tuple[SagaState, Fence | None] | SagaConflict]:
        """Insert new sagas and their steps, in two statements for the whole batch.

        A saga whose id exists (inserted earlier, by another process, or earlier in this
        batch) is read back instead: the existing one if it is the same saga, else a
        ``SagaConflict`` for that caller alone.
        """
        now = time.time()
        rows: list[dict[str, Any]] = []
        for new, owner, lease_seconds in batch:
            rows.append(
                {
                    "b_id": new.saga_id,
                    "b_saga_type": new.saga_type,
                    "b_definition_hash": new.definition_hash,
                    "b_status": (SagaStatus.RUNNING if owner else SagaStatus.PENDING).value,
                    "b_input": dumps(new.input),
                    "b_owner": owner,
                    "b_epoch": 1 if owner else 0,
                    "b_lease": lease_seconds if owner else None,
                    "b_ts": now,
                }
            )
        # Each id once per statement (a second row with the same id is read back below).
        first: dict[str, int] = {}
        for i, (new, _, _) in enumerate(batch):
            first.setdefault(new.saga_id, i)
        inserted = self._insert_sagas(conn, [rows[i] for i in first.values()])
        outcomes: list[tuple[SagaState, Fence | None] | SagaConflict] = []
        step_rows: list[dict[str, Any]] = []
        for i, (new, owner, _) in enumerate(batch):
            row = rows[i]
            if new.saga_id not in inserted or first[new.saga_id] != i:
                outcomes.append(self._existing_or_conflict(conn, new, row["b_input"]))
                continue
            # Steps in ``opened`` get their first attempt recorded with the insert (only for
            # a saga leased to its creator, which runs them at once).
            opened = set(new.opened) if owner else set()
            steps = {
                name: (
                    StepState(name, StepStatus.RUNNING, attempts=1, started_at=now)
                    if name in opened
                    else StepState(name)
                )
                for name in new.step_names
            }
            step_rows.extend(
                {
                    "b_id": new.saga_id,
                    "b_name": name,
                    "b_position": pos,
                    "b_status": step.status.value,
                    "b_attempts": step.attempts,
                    "b_started_at": step.started_at,
                }
                for pos, (name, step) in enumerate(steps.items())
            )
            state = SagaState(
                saga_id=new.saga_id,
                saga_type=new.saga_type,
                definition_hash=new.definition_hash,
                status=SagaStatus(row["b_status"]),
                input=loads(row["b_input"]),
                steps=steps,
                created_at=now,
                updated_at=now,
                lease_owner=owner,
                lease_epoch=row["b_epoch"],
            )
            outcomes.append((state, Fence(new.saga_id, owner, 1) if owner else None))
        if step_rows:
            self._insert_steps(conn, step_rows)
        return outcomes

    # Dialects may send these batches faster (saga_storage.postgres: one array statement).
    def _insert_sagas(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> set[str]:
        """Insert the new sagas ``rows`` (each id once); the ids that were not stored yet."""
        return set(conn.execute(self.sql.insert_sagas, rows).scalars())

    def _insert_steps(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Insert the step rows of new sagas."""
        self._execute_many(conn, self.sql.insert_step, rows)

    def _update_steps(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Record step rows, in order (a step may be written twice in one batch)."""
        self._execute_many(conn, self.sql.update_step, rows)

    def _existing_or_conflict(
        self, conn: Connection, new: NewSaga, input_json: str
    ) -> tuple[SagaState, Fence | None] | SagaConflict:
        try:
            found = self._existing(conn, new, input_json)
        except SagaConflict as exc:
            return exc
        if found is None:  # cannot happen: the insert saw the id, and rows are never deleted
            raise RuntimeError(f"saga {new.saga_id!r} neither inserted nor found")
        return found, None

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

    def write(
        self, fence: Fence, change: SagaWrite, *, claim_events: bool = False
    ) -> Coroutine[Any, Any, list[ClaimedKey]]:
        """Apply ``change`` after the fenced update, in one transaction.

        With ``claim_events``, returns the keys claimed for optimistic publishing.
        """
        if not self.coalesce:
            return self._run(self._write_change, fence, change, claim_events)
        return self._writes.submit(fence, change, claim_events)

    def _write_change(self, fence: Fence, change: SagaWrite, claim: bool) -> list[ClaimedKey]:
        with self._write() as conn:
            (outcome,) = self._apply_many(conn, [(fence, change, claim)])
        if isinstance(outcome, LeaseLost):
            raise outcome
        return [] if isinstance(outcome, _AlreadyApplied) else outcome

    def _write_batch(self, batch: list[Pending[Any]]) -> None:
        """Apply many sagas' creations and writes in one transaction (``saga_storage.coalesce``).

        A write whose fence fails writes nothing, so it fails alone without a savepoint; so
        does a creation that conflicts with an existing saga. Any other error rolls the whole
        batch back and reaches every caller, which retries its own write.
        """
        outcomes: list[tuple[Pending[Any], Any]] = []
        # Rows locked in saga id order, as a lease renewal (one UPDATE ... WHERE id IN, an
        # index scan in id order) locks them: two such transactions never deadlock. The sort is
        # stable, so one saga's writes keep their order.
        batch = sorted(batch, key=_saga_id_of)
        creations = [item for item in batch if item.args[0] is _CREATE]
        # A saga's writes come after its creation returned: creations go first, in any order.
        writes = [item for item in batch if item.args[0] is not _CREATE]
        with self._write() as conn:
            if creations:
                created = self._create_in(conn, [item.args[1:] for item in creations])
                outcomes.extend(zip(creations, created, strict=True))
            if writes:
                applied = self._apply_many(conn, [item.args for item in writes])
                outcomes.extend(
                    (item, [] if isinstance(outcome, _AlreadyApplied) else outcome)
                    for item, outcome in zip(writes, applied, strict=True)
                )
        for item, outcome in outcomes:  # only after the commit succeeded
            if isinstance(outcome, BaseException):
                item.error = outcome
            else:
                item.result = outcome
            item.done = True

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
        """One write in the caller's transaction, which any fence failure rolls back (the
        caller's own work in it must not commit without the write)."""
        (outcome,) = self._apply_many(conn, [(fence, change, False)])
        if isinstance(outcome, BaseException):
            raise outcome

    def _apply_many(
        self, conn: Connection, writes: Sequence[tuple[Fence, SagaWrite, bool]]
    ) -> list[list[ClaimedKey] | LeaseLost | _AlreadyApplied]:
        """Apply writes ``(fence, change, claim_events)`` in order, in ``conn``'s transaction.

        Three kinds of statement for the whole batch, whatever its size: the fenced updates,
        the step rows, the outbox rows (with their key upsert). A write whose fence fails
        writes nothing and gets ``LeaseLost``, or ``_AlreadyApplied`` if it had committed.
        """
        now = time.time()
        params = [_fence_params(fence, change, now) for fence, change, _ in writes]
        held = self._fence_all(conn, params)
        outcomes: list[list[ClaimedKey] | LeaseLost | _AlreadyApplied] = []
        step_rows: list[dict[str, Any]] = []
        events: list[OutboxEvent] = []
        claimer: dict[str, int] = {}  # key -> the write whose caller publishes its claim
        for i, ((fence, change, claim), ok) in enumerate(zip(writes, held, strict=True)):
            if not ok:
                outcomes.append(self._fence_failure(conn, fence, change, params[i]))
                continue
            outcomes.append([])
            step_rows.extend(_step_params(fence.saga_id, s) for s in change.steps)
            events.extend(change.events)
            if claim:
                for event in change.events:
                    claimer.setdefault(event.key, i)
        if step_rows:
            self._update_steps(conn, step_rows)
        if events:
            for claimed in self._append_many(conn, events, now, claim_keys=claimer.keys()):
                outcome = outcomes[claimer[claimed.key]]
                assert isinstance(outcome, list)
                outcome.append(claimed)
        return outcomes

    def _fence_all(self, conn: Connection, params: Sequence[dict[str, Any]]) -> list[bool]:
        """Run the fenced update of each write, in order; whether each matched its saga."""
        return [conn.execute(self.sql.fence_write, p).first() is not None for p in params]

    def _fence_failure(
        self, conn: Connection, fence: Fence, change: SagaWrite, params: dict[str, Any]
    ) -> LeaseLost | _AlreadyApplied:
        # A retried write whose first attempt committed has its events already: all or
        # nothing, so the whole change is there and must not be applied twice. Otherwise (or
        # if the lease is gone as well) the lease was lost.
        if (
            change.events
            and conn.execute(
                self.sql.event_exists, {"b_event_id": change.events[0].event_id}
            ).first()
            and conn.execute(self.sql.fence_holds, params).first()
        ):
            return _AlreadyApplied()
        return LeaseLost(fence.saga_id)

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
