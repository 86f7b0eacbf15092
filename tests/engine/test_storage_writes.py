"""The storage's batched paths on real databases: creations sharing a transaction, retried
writes, several events per write and per key in two statements."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy import exc as sa_exc

from saga_core import LeaseLost, SagaConflict, SagaStatus, StepStatus
from saga_core._stored_headers import StoredHeaders
from saga_core.events import OutboxEvent
from saga_core.records import NewSaga, SagaWrite, StepState
from saga_storage import SqlStorage, create_storage
from tests.support.threads import run_threads

pytestmark = pytest.mark.anyio

STEPS = ("a", "b", "c")


def _new(sid: str, amount: int = 1) -> NewSaga:
    return NewSaga(sid, "batched", "f" * 16, {"amount": amount}, STEPS, opened=("a",))


@contextlib.contextmanager
def _statements_sent(storage: SqlStorage, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every statement sent to the database meanwhile (an ``executemany`` counts once): on
    PostgreSQL counted on psycopg's cursor, which the storage also uses without SQLAlchemy;
    on SQLite with SQLAlchemy's events, and the batches sent on sqlite3's cursor."""
    sent: list[str] = []
    if storage.dialect == "postgresql":
        import psycopg

        for name in ("execute", "executemany"):
            original = getattr(psycopg.Cursor, name)

            def counted(self: Any, query: Any, *args: Any, _orig: Any = original, **kw: Any) -> Any:
                sent.append(str(query))
                return _orig(self, query, *args, **kw)

            monkeypatch.setattr(psycopg.Cursor, name, counted)
        yield sent
        monkeypatch.undo()
        return

    def count(conn: object, cursor: object, stmt: str, *args: object) -> None:
        sent.append(stmt)

    # SQLite sends batches of rows on sqlite3's own cursor (no SQLAlchemy event): a call of
    # ``_execute_many`` that SQLAlchemy did not see went there, as one executemany.
    direct = storage._execute_many

    def execute_many(conn: Any, stmt: Any, rows: Any) -> None:
        seen = len(sent)
        direct(conn, stmt, rows)
        if len(sent) == seen:
            sent.append(str(stmt.compile(dialect=storage.engine.dialect)))

    monkeypatch.setattr(storage, "_execute_many", execute_many)
    event.listen(storage.engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        event.remove(storage.engine, "before_cursor_execute", count)


def _count_outbox(storage: SqlStorage) -> int:
    with storage.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(storage.tables.outbox)).scalar())


async def test_concurrent_creations_of_one_id_insert_it_once(storage: SqlStorage) -> None:
    sid = f"s-{uuid.uuid4().hex[:8]}"
    others = [f"o-{uuid.uuid4().hex[:8]}" for _ in range(20)]
    results: dict[int, object] = {}

    async def create(i: int, new: NewSaga, owner: str | None) -> None:
        try:
            results[i] = await storage.create_saga(new, lease_owner=owner, lease_seconds=30)
        except SagaConflict as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        # Same id and input five times, once with another input, plus unrelated sagas: they
        # all queue for the same coalesced transactions.
        for i in range(5):
            tg.start_soon(create, i, _new(sid), f"owner-{i}")
        tg.start_soon(create, 5, _new(sid, amount=2), "owner-5")
        for j, other in enumerate(others):
            tg.start_soon(create, 10 + j, _new(other), "owner-x")

    stored = await storage.load_saga(sid)
    winner = stored.input["amount"]  # whichever input came first
    fences = [r[1] for r in map(results.get, range(6)) if isinstance(r, tuple) and r[1]]
    assert len(fences) == 1 and stored.lease_owner == fences[0].owner  # one lease, stored
    for i in range(6):
        amount = 2 if i == 5 else 1
        r = results[i]
        if amount == winner:
            assert isinstance(r, tuple) and r[0].saga_id == sid and r[0].input == stored.input
        else:
            assert isinstance(r, SagaConflict)
    for j, other in enumerate(others):
        state, fence = results[10 + j]  # type: ignore[misc]
        assert fence is not None and fence.epoch == 1
        loaded = await storage.load_saga(other)
        assert loaded.status == SagaStatus.RUNNING
        assert loaded.steps["a"].status == StepStatus.RUNNING and loaded.steps["a"].attempts == 1
        assert [s.status for n, s in loaded.steps.items() if n != "a"] == [StepStatus.PENDING] * 2
        assert state.steps == loaded.steps


async def test_creation_without_coalescing_behaves_the_same(storage: SqlStorage) -> None:
    storage.coalesce = False
    sid = f"s-{uuid.uuid4().hex[:8]}"
    state, fence = await storage.create_saga(_new(sid), lease_owner="me", lease_seconds=30)
    assert fence is not None and state.status == SagaStatus.RUNNING
    again, none = await storage.create_saga(_new(sid), lease_owner="me", lease_seconds=30)
    assert none is None and again.saga_id == sid and again.lease_owner == "me"
    with pytest.raises(SagaConflict):
        await storage.create_saga(_new(sid, amount=3), lease_owner=None, lease_seconds=30)


@pytest.mark.parametrize("coalesce", [True, False])
async def test_a_retried_write_whose_first_try_committed_is_not_applied_twice(
    storage: SqlStorage, coalesce: bool
) -> None:
    storage.coalesce = coalesce
    sid = f"s-{uuid.uuid4().hex[:8]}"
    _, fence = await storage.create_saga(_new(sid), lease_owner="me", lease_seconds=30)
    assert fence is not None
    events = tuple(OutboxEvent(event_type=f"e{i}", payload={"i": i}, saga_id=sid) for i in range(3))
    change = SagaWrite(
        steps=(StepState("a", StepStatus.SUCCEEDED, outcome="succeeded", attempts=1),),
        events=events,
    )
    await storage.write(fence, change)
    version = (await storage.load_saga(sid)).steps
    await storage.write(fence, change)  # the caller could not know the first one committed
    assert _count_outbox(storage) == 3
    assert (await storage.load_saga(sid)).steps == version

    # With the lease gone as well, the retry is refused as a lost lease, not taken as done.
    with storage.engine.begin() as conn:
        conn.execute(
            update(storage.tables.sagas)
            .where(storage.tables.sagas.c.id == sid)
            .values(lease_epoch=storage.tables.sagas.c.lease_epoch + 1)
        )
    with pytest.raises(LeaseLost):
        await storage.write(fence, change)
    assert _count_outbox(storage) == 3


async def test_events_of_several_keys_take_consecutive_sequences_in_two_statements(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"k{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    # Interleaved keys, in an order that is not the keys' sorted order.
    events = [
        OutboxEvent(event_type="t", payload={"n": n}, aggregate_id=keys[(n * 3) % 4])
        for n in range(20)
    ]
    with storage.engine.begin() as conn:
        storage.append_outbox(events[0], conn=conn)  # key 0 has one event already
    with _statements_sent(storage, monkeypatch) as statements, storage.engine.begin() as conn:
        storage.append_outbox_many(events[1:], conn=conn)
    sent = [s for s in statements if not s.lstrip().upper().startswith("BEGIN")]
    assert len(sent) == 2, sent
    assert all(s.lstrip().upper().startswith("INSERT") for s in sent), sent
    out = storage.tables.outbox
    with storage.engine.connect() as conn:
        rows = conn.execute(select(out.c.key, out.c.seq, out.c.event_id).order_by(out.c.id)).all()
    by_key: dict[str, list[tuple[int, str]]] = {}
    for key, seq, event_id in rows:
        by_key.setdefault(key, []).append((seq, event_id))
    for key in keys:
        expected = [e.event_id for e in events if e.key == key]
        got = sorted(by_key[key])
        assert [s for s, _ in got] == list(range(1, len(expected) + 1))  # gap-free from 1
        assert [e for _, e in got] == expected  # in the order they were appended


async def test_append_many_refuses_bad_input_before_writing(storage: SqlStorage) -> None:
    e = OutboxEvent(event_type="t", payload={}, aggregate_id="k")
    with storage.engine.begin() as conn:
        with pytest.raises(ValueError, match="appears twice"):
            storage.append_outbox_many([e, e], conn=conn)
        with pytest.raises(TypeError, match="item 1 is dict"):
            storage.append_outbox_many([e, {"event_type": "x"}], conn=conn)  # type: ignore[list-item]
    with storage.engine.connect() as conn, pytest.raises(ValueError, match="inside a transaction"):
        storage.append_outbox_many([e], conn=conn)
    assert _count_outbox(storage) == 0


async def test_append_many_claims_each_free_key_with_all_its_new_events(
    storage: SqlStorage,
) -> None:
    held, free = f"held-{uuid.uuid4().hex[:6]}", f"free-{uuid.uuid4().hex[:6]}"
    with storage.engine.begin() as conn:
        first = storage.append_outbox(
            OutboxEvent(event_type="t", payload={}, aggregate_id=held), conn=conn, claim=True
        )
    assert first is not None  # the key is now held by that (unpublished) claim
    events = [
        OutboxEvent(event_type="t", payload={"n": n}, aggregate_id=k)
        for n, k in enumerate([free, held, free, free])
    ]
    with storage.engine.begin() as conn:
        claims = storage.append_outbox_many(events, conn=conn, claim=True)
    assert [c.key for c in claims] == [free]
    assert [r.event_id for r in claims[0].events] == [e.event_id for e in events if e.key == free]
    assert [r.seq for r in claims[0].events] == [1, 2, 3]
    assert claims[0].events[0].headers["event_id"] == events[0].event_id
    assert await storage.committed_claims(claims) == claims


async def test_a_batch_of_writes_fails_exactly_the_writes_whose_fence_fails(
    storage: SqlStorage,
) -> None:
    sids = [f"s{i:02d}-{uuid.uuid4().hex[:6]}" for i in range(30)]
    fences = {}
    for sid in sids:
        _, fence = await storage.create_saga(_new(sid), lease_owner="me", lease_seconds=30)
        assert fence is not None
        fences[sid] = fence
    stolen = {sids[3], sids[17], sids[29]}
    sagas = storage.tables.sagas
    with storage.engine.begin() as conn:
        conn.execute(
            update(sagas)
            .where(sagas.c.id.in_(stolen))
            .values(lease_epoch=sagas.c.lease_epoch + 1, lease_owner="thief")
        )
    retried = sids[8]

    def change(sid: str) -> SagaWrite:
        return SagaWrite(
            steps=(StepState("a", StepStatus.SUCCEEDED, outcome="succeeded", attempts=1),),
            events=(OutboxEvent(event_type="a_done", payload={"sid": sid}, saga_id=sid),),
        )

    changes = {sid: change(sid) for sid in sids}
    await storage.write(fences[retried], changes[retried])  # its first try committed
    results: dict[str, object] = {}

    async def write(sid: str) -> None:
        try:
            results[sid] = await storage.write(fences[sid], changes[sid], claim_events=True)
        except LeaseLost as exc:
            results[sid] = exc

    async with anyio.create_task_group() as tg:  # all queued for the same batches
        for sid in sids:
            tg.start_soon(write, sid)
    assert {sid for sid, r in results.items() if isinstance(r, LeaseLost)} == stolen
    assert results[retried] == []  # nothing new to publish: it was stored before
    out = storage.tables.outbox
    with storage.engine.connect() as conn:
        stored = sorted(conn.execute(select(out.c.saga_id)).scalars())
    assert stored == sorted(set(sids) - stolen)  # each once, none of a stolen saga
    for sid in sids:
        state = await storage.load_saga(sid)
        expected = StepStatus.RUNNING if sid in stolen else StepStatus.SUCCEEDED
        assert state.steps["a"].status == expected
        if sid not in stolen and sid != retried:
            claims = results[sid]
            assert isinstance(claims, list) and [c.key for c in claims] == [sid]


def test_writers_of_the_same_keys_in_any_order_do_not_deadlock(pg_url: str) -> None:
    """Backs docs/outbox.md: ``append_outbox_many`` locks its keys in sorted order, so writers
    that each append to the same keys, listed in different orders, queue instead of
    deadlocking (PostgreSQL aborts one of two deadlocked transactions)."""
    import random
    import time

    storage = create_storage(pg_url)
    keys = [f"k{i}" for i in range(6)]
    per_writer, writers = 40, 4

    def write(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(per_writer):
            order = rng.sample(keys, len(keys))
            events = [OutboxEvent(event_type="t", payload={}, aggregate_id=k) for k in order]
            with storage.engine.begin() as conn:
                storage.append_outbox_many(events, conn=conn)
                time.sleep(0.001)  # hold the key rows while the others queue

    try:
        assert run_threads(write, writers, timeout=120) == []
        out = storage.tables.outbox
        with storage.engine.connect() as conn:
            rows = conn.execute(select(out.c.key, out.c.seq)).all()
        for key in keys:  # every append committed, each key gap-free
            seqs = sorted(seq for k, seq in rows if k == key)
            assert seqs == list(range(1, per_writer * writers + 1))
    finally:
        storage.dispose()


async def test_an_event_id_stored_already_is_refused_alike_on_every_dialect(
    storage: SqlStorage,
) -> None:
    """Appending an event whose id is stored fails with SQLAlchemy's ``IntegrityError``, alone
    or in a batch, and the application transaction writes nothing."""
    first = OutboxEvent(event_type="t", payload={}, aggregate_id=f"k-{uuid.uuid4().hex[:6]}")
    with storage.engine.begin() as conn:
        storage.append_outbox(first, conn=conn)
    other = OutboxEvent(event_type="t", payload={}, aggregate_id=f"j-{uuid.uuid4().hex[:6]}")
    with pytest.raises(sa_exc.IntegrityError), storage.engine.begin() as conn:
        storage.append_outbox(first, conn=conn)
    with pytest.raises(sa_exc.IntegrityError), storage.engine.begin() as conn:
        storage.append_outbox_many([other, first], conn=conn)
    assert _count_outbox(storage) == 1


def test_a_sqlite_batch_failure_is_reported_as_a_single_row_failure_is(tmp_path: Any) -> None:
    """SQLite sends a batch of rows on sqlite3's own cursor: a failure there is the class
    SQLAlchemy raises for one row (which it sends itself), ``OperationalError`` here, naming
    the cause (the storage's writers turn both into ``StorageError``), and nothing of the
    transaction is kept."""
    storage = create_storage(f"sqlite:///{tmp_path / 'broken.db'}")
    try:
        one = [OutboxEvent(event_type="t", payload={}, aggregate_id="k")]
        many = [OutboxEvent(event_type="t", payload={}, aggregate_id=f"k{i}") for i in range(3)]
        with storage.engine.begin() as conn:  # a real fault: the outbox table is gone
            conn.exec_driver_sql(f"ALTER TABLE {storage.tables.outbox.name} RENAME TO gone")
        for events in (one, many):
            with (
                pytest.raises(sa_exc.OperationalError, match="no such table"),
                storage.engine.begin() as conn,
            ):
                storage.append_outbox_many(events, conn=conn)
        keys = select(func.count()).select_from(storage.tables.outbox_key)
        with storage.engine.connect() as conn:  # the key rows of the failed batches: none
            assert conn.execute(keys).scalar() == 0
    finally:
        storage.dispose()


async def test_statements_over_key_lists_have_one_text_for_any_number_of_keys(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backs docs/configuration.md: on PostgreSQL a list of keys is one array parameter, so a
    relay claim and its completion send the same SQL text for 1 key as for 5 (psycopg then
    caches and prepares them), where one parameter per key would change the text."""
    storage = create_storage(pg_url)
    try:
        texts: list[list[str]] = []
        for n in (1, 5):
            events = [
                OutboxEvent(event_type="t", payload={}, aggregate_id=f"k{n}-{i}") for i in range(n)
            ]
            with storage.engine.begin() as conn:
                storage.append_outbox_many(events, conn=conn)
            with _statements_sent(storage, monkeypatch) as sent:
                claims = await storage.claim_outbox(
                    "relay", max_keys=100, max_events=10, claim_seconds=30
                )
                await storage.complete_outbox_many(
                    [(c, len(c.events), None) for c in claims], retry_in=0.0, dead_after=3
                )
            assert sorted(c.key for c in claims) == sorted(e.key for e in events)
            texts.append(sent)
        assert len(texts[0]) >= 4 and texts[0] == texts[1]
        assert any("ANY" in t for t in texts[0]), texts[0]
    finally:
        storage.dispose()


async def test_claimed_events_keep_the_header_text_they_were_stored_with(
    storage: SqlStorage,
) -> None:
    """The relay's records carry their headers' stored JSON text (what the Redis adapter sends
    as it is, tests/brokers/test_redis_streams.py), equal to the headers themselves."""
    event = OutboxEvent(
        event_type="t", payload={"n": 1}, aggregate_id="k", headers={"region": "eu"}
    )
    with storage.engine.begin() as conn:
        storage.append_outbox(event, conn=conn)
    with storage.engine.connect() as conn:
        stored = conn.execute(select(storage.tables.outbox.c.headers)).scalar_one()
    [claim] = await storage.claim_outbox("relay", max_keys=10, max_events=10, claim_seconds=30)
    [record] = claim.events
    assert isinstance(record.headers, StoredHeaders)
    assert record.headers.json == stored
    assert record.headers == event.message_headers()


async def test_batched_step_records_store_every_column_and_keep_their_order(
    storage: SqlStorage,
) -> None:
    """Step records of many sagas in one transaction (one array statement on PostgreSQL) store
    every column as given; the same step written twice in one batch ends as written last (a
    statement updates a row once, so such a batch goes row by row)."""
    from saga_core.errors import ErrorRecord
    from saga_storage.coalesce import Pending

    sids = [f"cols-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    fences = []
    for sid in sids:
        _, fence = await storage.create_saga(_new(sid), lease_owner="me", lease_seconds=30)
        assert fence is not None
        fences.append(fence)

    def full(sid: str, n: int) -> StepState:
        return StepState(
            "b",
            StepStatus.COMPENSATION_FAILED,
            outcome="unknown",
            attempts=3 + n,
            result={"sid": sid, "n": n},
            error=ErrorRecord("RuntimeError", f"boom {n}"),
            crashes=n,
            compensation_attempts=2,
            compensation_error=ErrorRecord("ValueError", f"undo {n}"),
            started_at=1000.5 + n,
            finished_at=2000.25 + n,
        )

    expected = {sid: full(sid, n) for n, sid in enumerate(sids)}
    batch: list[Pending[Any]] = [
        Pending((f, SagaWrite(steps=(expected[f.saga_id],)), False)) for f in fences
    ]
    # The first saga's step "a" twice in the same batch: RUNNING, then SUCCEEDED.
    running = StepState("a", StepStatus.RUNNING, attempts=2, started_at=5.0)
    succeeded = StepState(
        "a", StepStatus.SUCCEEDED, outcome="succeeded", attempts=2, result={}, started_at=5.0
    )
    batch.append(Pending((fences[0], SagaWrite(steps=(running,)), False)))
    batch.append(Pending((fences[0], SagaWrite(steps=(succeeded,)), False)))
    await anyio.to_thread.run_sync(storage._write_batch, batch)
    assert all(item.done and item.error is None for item in batch)
    for sid in sids:
        state = await storage.load_saga(sid)
        assert state.steps["b"] == expected[sid]
    assert (await storage.load_saga(sids[0])).steps["a"] == succeeded

    # Without the repeated step, the same batch goes as arrays: still every column.
    again = {sid: full(sid, 10 + n) for n, sid in enumerate(sids)}
    batch = [Pending((f, SagaWrite(steps=(again[f.saga_id],)), False)) for f in fences]
    await anyio.to_thread.run_sync(storage._write_batch, batch)
    for sid in sids:
        assert (await storage.load_saga(sid)).steps["b"] == again[sid]


async def test_creations_with_int_and_float_leases_share_a_batch(storage: SqlStorage) -> None:
    """Orchestrators with leases of 30 (an int) and 12.5 (a float) creating sagas at once: one
    batch holds both kinds (PostgreSQL's array statement takes the leases as one float list),
    every creation succeeds and each lease is what its creator asked for."""
    sids = [f"mix-{i}-{uuid.uuid4().hex[:6]}" for i in range(10)]
    leases: dict[str, float] = {sid: (30 if i % 2 else 12.5) for i, sid in enumerate(sids)}
    fences: dict[str, Any] = {}

    async def create(sid: str) -> None:
        _, fences[sid] = await storage.create_saga(
            _new(sid), lease_owner="me", lease_seconds=leases[sid]
        )

    async with anyio.create_task_group() as tg:
        for sid in sids:
            tg.start_soon(create, sid)
    assert all(fences[sid] is not None for sid in sids)
    for sid in sids:
        state = await storage.load_saga(sid)
        assert state.lease_until is not None
        assert abs(state.lease_until - state.created_at - leases[sid]) < 5


async def test_two_batches_in_flight_share_sagas_and_keys_without_deadlock(pg_url: str) -> None:
    """PostgreSQL applies two coalesced batches at once (docs/configuration.md). Writes of one
    saga issued together (as parallel steps do) and events of shared keys listed in any order
    land in both batches: every write commits (a deadlock or any failure of a batch would fail
    its writes), each key's sequence stays gap-free, and the two batches did overlap.

    It does not prove the lock order: a batch takes all its key rows in one statement, so a
    wrong order rarely meets the other batch in time (made unsorted on purpose, this test still
    passed). The key order itself is backed by
    ``test_writers_of_the_same_keys_in_any_order_do_not_deadlock``."""
    import random
    import threading

    storage = create_storage(pg_url)
    try:
        assert storage.parallel_flushes == 2
        running, most = [0], [0]
        lock = threading.Lock()
        apply_many = storage._apply_many

        def counted(*args: Any, **kwargs: Any) -> Any:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                return apply_many(*args, **kwargs)
            finally:
                with lock:
                    running[0] -= 1

        storage._apply_many = counted  # type: ignore[method-assign]
        sids = [f"dl-{i:02d}-{uuid.uuid4().hex[:6]}" for i in range(40)]
        fences = {}
        for sid in sids:
            _, fences[sid] = await storage.create_saga(
                _new(sid), lease_owner="me", lease_seconds=60
            )
        keys = [f"shared-{i}" for i in range(5)]
        rng = random.Random(3)

        def change(sid: str, step: str) -> SagaWrite:
            order = rng.sample(keys, 3)
            return SagaWrite(
                steps=(StepState(step, StepStatus.RUNNING, attempts=1, started_at=1.0),),
                events=tuple(
                    OutboxEvent(event_type="t", payload={"s": sid}, aggregate_id=k, saga_id=sid)
                    for k in order
                ),
            )

        written = 0
        with anyio.fail_after(60):
            for round_ in range(10):
                # Even rounds: one write per saga (the batches share only keys); odd rounds:
                # two per saga at once (a saga's writes may be in both batches).
                steps = ("b",) if round_ % 2 == 0 else ("b", "c")
                async with anyio.create_task_group() as tg:
                    for sid in rng.sample(sids, len(sids)):
                        for step in steps:
                            tg.start_soon(storage.write, fences[sid], change(sid, step))
                            written += 1
        assert most[0] == 2  # two batches were applied at once
        out = storage.tables.outbox
        with storage.engine.connect() as conn:
            rows = conn.execute(select(out.c.key, out.c.seq)).all()
        assert len(rows) == written * 3  # every write committed
        for key in keys:  # each key gap-free
            seqs = sorted(seq for k, seq in rows if k == key)
            assert seqs == list(range(1, len(seqs) + 1))
    finally:
        storage.dispose()


def test_the_fenced_updates_of_a_batch_in_one_statement_do_what_they_do_one_by_one(
    pg_url: str,
) -> None:
    """PostgreSQL applies a batch's fenced updates as one array statement. Every kind of write
    (a step record alone, a status with an error, a final status that lets the lease go, a
    suspension with a wake time, a note, a write whose fence fails, a retry whose first try
    committed) leaves each saga row exactly as the one-by-one statement does, and reports the
    same fences as held."""
    from saga_core.errors import ErrorRecord
    from saga_core.records import Fence
    from saga_storage.saga_repository import SagaRepository, _fence_params

    storage = create_storage(pg_url)
    sagas, out = storage.tables.sagas, storage.tables.outbox
    try:
        stored_event = OutboxEvent(event_type="done", payload={}, saga_id="x")
        kinds = [
            SagaWrite(),
            SagaWrite(
                status=SagaStatus.COMPENSATING,
                failed_step="b",
                error=ErrorRecord("Boom", "it broke"),
            ),
            SagaWrite(status=SagaStatus.COMPLETED, release_lease=True),
            SagaWrite(status=SagaStatus.FAILED, reason="compensation_failed", release_lease=True),
            SagaWrite(wake_in=12.5),
            SagaWrite(status=SagaStatus.FAILED, reason="forward_stuck", note="an operator's"),
            SagaWrite(events=(OutboxEvent(event_type="e", payload={}, saga_id="x"),)),
            SagaWrite(),  # its fence fails (another owner took the saga)
            SagaWrite(events=(stored_event,)),  # its first try committed: matches nothing
        ]
        results: dict[str, tuple[list[bool], list[dict[str, Any]]]] = {}
        for how in ("one by one", "one statement"):
            fences: list[Fence] = []
            for i in range(len(kinds)):
                sid = f"fw-{how[4]}-{i}-{uuid.uuid4().hex[:6]}"
                _, fence = anyio.run(
                    lambda s=sid: storage.create_saga(_new(s), lease_owner="me", lease_seconds=30)
                )
                assert fence is not None
                fences.append(fence)
            with storage.engine.begin() as conn:
                conn.execute(
                    update(sagas)
                    .where(sagas.c.id == fences[7].saga_id)
                    .values(lease_epoch=sagas.c.lease_epoch + 1, lease_owner="thief")
                )
                if how == "one by one":  # the event id is then stored for both runs
                    row = {
                        "event_id": stored_event.event_id,
                        "saga_id": fences[8].saga_id,
                        "topic": "t",
                        "key": fences[8].saga_id,
                        "seq": 1,
                        "event_type": "done",
                        "payload": "{}",
                        "headers": "{}",
                        "status": "SENT",
                        "attempts": 0,
                        "created_at": 1.0,
                    }
                    conn.execute(out.insert().values(**row))
            params = [_fence_params(f, k, 1000.0) for f, k in zip(fences, kinds, strict=True)]
            with storage.engine.begin() as conn:
                if how == "one by one":
                    held = SagaRepository._fence_all(storage, conn, params)
                else:
                    held = storage._fence_all(conn, params)
                    rows = conn.execute(select(sagas.c.id)).all()
                    assert rows  # the statement ran on the transaction's connection
            with storage.engine.connect() as conn:
                stored = [
                    dict(conn.execute(select(sagas).where(sagas.c.id == f.saga_id)).one()._mapping)
                    for f in fences
                ]
            results[how] = (held, stored)
        (held_1, rows_1), (held_n, rows_n) = results["one by one"], results["one statement"]
        assert held_1 == held_n == [True] * 7 + [False, False]
        for one, many in zip(rows_1, rows_n, strict=True):
            assert (one["updated_at"] == 1000.0) == (many["updated_at"] == 1000.0)
            for column in ("id", "created_at", "updated_at", "lease_until", "wake_at"):
                a, b = one.pop(column), many.pop(column)
                if column in ("created_at", "updated_at"):
                    continue
                if column == "wake_at" and a is not None:
                    assert b is not None and abs(a - b) < 60  # the database clock plus 12.5 s
                else:
                    assert (a is None) == (b is None), column
            assert one == many
        assert rows_n[4]["lease_owner"] is None and rows_n[2]["status"] == "COMPLETED"
        assert [r["version"] for r in rows_n] == [1] * 7 + [0, 0]
    finally:
        storage.dispose()


async def test_a_write_batch_reads_rows_by_key_on_a_table_never_analyzed(pg_url: str) -> None:
    """The batch's array updates join a few hundred rows to the sagas and steps tables by key.
    On a table the planner has no statistics for (a new deployment), it took the table for a
    small one and hashed all of it on every batch; each array update of a real batch must be
    planned as index lookups: no sequential scan, no hash or merge join."""
    import psycopg

    from saga_storage.saga_repository import _fence_params

    storage = create_storage(pg_url)
    try:
        fences = {}

        async def create(i: int) -> None:
            sid = f"plan-{i:05d}-{uuid.uuid4().hex[:6]}"
            _, fences[sid] = await storage.create_saga(
                _new(sid), lease_owner="me", lease_seconds=60
            )

        async with anyio.create_task_group() as tg:
            for i in range(3000):
                tg.start_soon(create, i)
        plans: list[str] = []
        original = psycopg.Cursor.execute

        def explained(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
            if str(query).lstrip().startswith(("UPDATE", "WITH")) and params:
                original(self, f"EXPLAIN {query}", params)
                plans.append("\n".join(row[0] for row in self.fetchall()))
            return original(self, query, params, **kw)

        psycopg.Cursor.execute = explained  # type: ignore[method-assign]
        try:
            async with anyio.create_task_group() as tg:
                for sid in list(fences)[1000:1300]:
                    change = SagaWrite(
                        steps=(StepState("a", StepStatus.SUCCEEDED, attempts=1, result={}),),
                        events=(OutboxEvent(event_type="a_done", payload={}, saga_id=sid),),
                    )
                    tg.start_soon(storage.write, fences[sid], change)
        finally:
            psycopg.Cursor.execute = original  # type: ignore[method-assign]
        kinds = {"sagas" if "saga_sagas s" in p.split("\n")[0] else "steps" for p in plans}
        assert kinds == {"sagas", "steps"}  # both array updates ran, and were read
        for plan in plans:
            assert "Seq Scan" not in plan and "Hash Join" not in plan and "Merge" not in plan, plan
            assert "Index Scan" in plan, plan
        # The fenced updates lock their saga rows in id order, as lease renewals do (no
        # deadlock between them): rows are locked as a sort by id hands them over.
        fence = next(p for p in plans if "saga_sagas s" in p.split("\n")[0])
        lock = fence.index("LockRows")
        assert 'Sort Key: ((l.id)::character varying(255)) COLLATE "C"' in fence[lock:], fence
        # SET LOCAL: the settings end with the batch's transaction, on its pooled connection.
        with storage.engine.connect() as conn:
            with conn.begin():
                params = [_fence_params(fences[sid], SagaWrite(), 1.0) for sid in list(fences)[:2]]
                storage._fence_all(conn, params)
                assert conn.exec_driver_sql("SHOW enable_seqscan").scalar() == "off"
            assert conn.exec_driver_sql("SHOW enable_seqscan").scalar() == "on"
            assert conn.exec_driver_sql("SHOW enable_hashjoin").scalar() == "on"
    finally:
        storage.dispose()


async def test_relay_claims_and_publish_completions_read_rows_by_key_on_tables_never_analyzed(
    pg_url: str,
) -> None:
    """Completing the publishes of a few hundred keys (marking their events sent, reading what
    follows) joined them to the whole outbox by hash on tables the planner has no statistics
    for: 8 ms instead of 1 for 250 keys among 60,000 events, growing with the table. The
    relay's claims and every completion must be planned as index lookups."""
    import psycopg

    storage = create_storage(pg_url)
    try:
        events = [
            OutboxEvent(aggregate_type="acct", aggregate_id=f"{i:05d}", event_type="t", payload={})
            for i in range(6000)
        ]
        with storage.engine.begin() as conn:
            storage.append_outbox_many(events[:5700], conn=conn)
        with storage.engine.begin() as conn:
            claims = storage.append_outbox_many(events[5700:], conn=conn, claim=True)
        with storage.engine.begin() as conn:  # committed while claimed: follow-ups
            more = [
                OutboxEvent(aggregate_type="acct", aggregate_id=f"{i:05d}", event_type="t2")
                for i in range(5700, 5750)
            ]
            storage.append_outbox_many(more, conn=conn)
        assert len(claims) == 300
        plans: list[str] = []
        original = psycopg.Cursor.execute

        def explained(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
            text_ = str(query).lstrip()
            if text_.startswith(("UPDATE", "SELECT")) and "saga_outbox" in text_ and params:
                original(self, f"EXPLAIN {query}", params)
                plans.append("\n".join(row[0] for row in self.fetchall()))
            return original(self, query, params, **kw)

        psycopg.Cursor.execute = explained  # type: ignore[method-assign]
        try:
            follows = await storage.complete_outbox_many(
                [(c, 1, None) for c in claims], retry_in=0.0, dead_after=3, follow=10
            )
            completed = len(plans)
            rounds = await storage.claim_outbox("t", max_keys=300, max_events=10, claim_seconds=30)
            await storage.complete_outbox_many(
                [(c, len(c.events), None) for c in rounds], retry_in=0.0, dead_after=3
            )
        finally:
            psycopg.Cursor.execute = original  # type: ignore[method-assign]
        assert len(follows) == 50 and len(rounds) == 300
        assert completed >= 5 and len(plans) >= completed + 5  # every statement was read
        for plan in plans:
            assert "Seq Scan" not in plan and "Hash Join" not in plan and "Merge" not in plan, plan
            assert "Index" in plan, plan
    finally:
        storage.dispose()


async def test_a_transactional_steps_own_sql_runs_under_the_default_planner_settings(
    pg_url: str,
) -> None:
    """The planner settings a write batch sets (``SET LOCAL``) are for the library's own
    statements: a transactional step's SQL, in the transaction its record commits in, runs
    before them, with the server's defaults, even with many such sagas at once."""
    from sqlalchemy import text

    from saga_core import DeclarativeSaga, SagaOrchestrator, StepContext, step

    class _Reads(DeclarativeSaga):
        saga_type = "test-planner-settings"

        @step(transactional=True)
        def read(self, ctx: StepContext) -> dict[str, Any]:
            row = ctx.connection.execute(
                text("SELECT current_setting('enable_seqscan'), current_setting('enable_hashjoin')")
            ).one()
            return {"seqscan": row[0], "hashjoin": row[1]}

        @step(depends_on=["read"])
        async def after(self, ctx: StepContext) -> dict[str, Any]:
            return {}

    storage = create_storage(pg_url)
    try:
        orch = SagaOrchestrator(storage)
        results: list[Any] = []

        async def one() -> None:
            results.append(await orch.execute(_Reads(), {}))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        assert len(results) == 20
        assert all(r["seqscan"] == "on" and r["hashjoin"] == "on" for r in results), results
    finally:
        storage.dispose()
