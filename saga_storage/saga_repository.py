"""The saga half of the repository: sagas and steps, fenced writes, leases and claims
(DESIGN.md section 3)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Row

from saga_core._json import dumps, loads
from saga_core.errors import ErrorRecord, LeaseLost, SagaConflict, SagaNotFound
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


class _AlreadyApplied(Exception):
    """A retried write whose first try had committed (its event ids exist): nothing to redo."""


class SagaRepository(OutboxRepository):
    """Saga and step rows."""

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
                # Steps in ``opened`` get their first attempt recorded with the insert (only for
                # a saga leased to its creator, which runs them at once).
                opened = set(new.opened) if owner else set()
                rows = {
                    name: (
                        StepState(name, StepStatus.RUNNING, attempts=1, started_at=now)
                        if name in opened
                        else StepState(name)
                    )
                    for name in new.step_names
                }
                conn.execute(
                    self.sql.insert_step,
                    [
                        {
                            "b_id": new.saga_id,
                            "b_name": name,
                            "b_position": i,
                            "b_status": row.status.value,
                            "b_attempts": row.attempts,
                            "b_started_at": row.started_at,
                        }
                        for i, (name, row) in enumerate(rows.items())
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
            steps=rows,
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

    async def write(
        self, fence: Fence, change: SagaWrite, *, claim_events: bool = False
    ) -> list[ClaimedKey]:
        """Apply ``change`` after the fenced update, in one transaction.

        With ``claim_events``, returns the keys claimed for optimistic publishing.
        """
        if not self.coalesce:
            return await self._run(self._write_change, fence, change, claim_events)
        result: list[ClaimedKey] = await self._writes.submit(fence, change, claim_events)
        return result

    def _write_change(self, fence: Fence, change: SagaWrite, claim: bool) -> list[ClaimedKey]:
        try:
            with self._write() as conn:
                return self._apply(conn, fence, change, claim)
        except _AlreadyApplied:
            return []

    def _write_batch(self, batch: list[Pending[list[ClaimedKey]]]) -> None:
        """Apply many sagas' writes in one transaction (see ``saga_storage.coalesce``).

        A write whose fence fails stops before writing anything, so it fails alone without a
        savepoint. Any other error rolls the whole batch back and reaches every writer, which
        retries its own write.
        """
        outcomes: list[tuple[Pending[list[ClaimedKey]], list[ClaimedKey] | BaseException]] = []
        with self._write() as conn:
            for item in batch:
                fence, change, claim = item.args
                try:
                    outcomes.append((item, self._apply(conn, fence, change, claim)))
                except LeaseLost as exc:
                    outcomes.append((item, exc))
                except _AlreadyApplied:
                    outcomes.append((item, []))  # its rows were rewritten with the same values
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

    def _apply(
        self, conn: Connection, fence: Fence, change: SagaWrite, claim: bool = False
    ) -> list[ClaimedKey]:
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
            claims = [self._append(conn, event, now, claim) for event in change.events]
            return [c for c in claims if c is not None]
        return []

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
