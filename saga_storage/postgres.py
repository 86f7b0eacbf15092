"""PostgreSQL specifics: psycopg 3, the database clock, SKIP LOCKED claims, advisory-locked
migrations and a statement timeout on every connection (DESIGN.md sections 3 and 5)."""

from __future__ import annotations

import contextlib
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

import anyio
import psycopg
from anyio.lowlevel import RunVar
from sqlalchemy import (
    Connection,
    Engine,
    Select,
    any_,
    bindparam,
    create_engine,
    event,
    literal_column,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ColumnElement

from saga_core.errors import StorageError
from saga_storage._pg_arrays import (
    FENCE_COLUMNS,
    OUTBOX_ARRAY_COLUMNS,
    SAGA_ARRAY_COLUMNS,
    STEP_INSERT_COLUMNS,
    STEP_UPDATE_COLUMNS,
    array_statements,
    arrays,
)
from saga_storage.repository import SqlStorage

DEFAULT_POOL_SIZE = 10


def make_postgres_engine(
    url: str, *, pool_size: int = DEFAULT_POOL_SIZE, statement_timeout: float = 30.0
) -> Engine:
    """An engine on psycopg 3 with a bounded pool and a statement timeout per connection.

    Database calls are bounded by ``statement_timeout`` rather than by abandoning threads.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername != "postgresql+psycopg":
        raise ValueError(
            f"unsupported PostgreSQL driver {parsed.drivername!r}; use postgresql+psycopg://"
        )
    engine = create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=0,
        # No pre-ping: it is a round trip before every transaction. A connection broken by a
        # server restart fails its first statement instead; SQLAlchemy then invalidates the
        # whole pool, and our writers retry on StorageError.
        pool_timeout=statement_timeout,
    )
    timeout_ms = int(statement_timeout * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET statement_timeout = {timeout_ms}")
        dbapi_conn.commit()

    return engine


class PostgresStorage(SqlStorage):
    """Storage in PostgreSQL: any number of worker processes can share it."""

    dialect = "postgresql"
    # While one batch of saga writes commits, the next is written in another transaction.
    # They cannot deadlock: each locks saga rows in id order, then outbox keys in key order.
    # A third brought nothing measurable (docs/benchmarks.md).
    parallel_flushes = 2

    def __init__(
        self,
        engine: Engine,
        *,
        prefix: str = "saga_",
        schema: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        notify: bool = False,
    ) -> None:
        # The thread limiter matches the pool, so threads never queue on the pool itself.
        super().__init__(engine, prefix=prefix, schema=schema, max_threads=pool_size)
        self._lease_engine: Engine | None = None
        # Renewal calls running in worker threads, which ``dispose`` waits for; guards
        # ``_lease_engine`` too.
        self._lease_calls = threading.Condition()
        self._lease_calls_in_flight = 0
        # Opt-in: a commit carrying NOTIFY takes a global lock in PostgreSQL, which caps write
        # throughput; polling stays the guarantee either way.
        self.notify = notify
        self._channel = f"{self.tables.outbox.name}_events"
        self._listener: Any = None
        self._listen_limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"saga_listen_{id(self)}")
        self._arrays = array_statements(engine, self.tables, _NOW)

    @contextlib.contextmanager
    def _lease_write(self) -> Iterator[Connection]:
        # Renewals get a connection of their own: a pool busy with step records must not make
        # a worker lose its leases.
        with self._lease_calls:
            self._lease_calls_in_flight += 1
            # Created under the lock: renewals of several lease groups may start at once
            # (each in its thread), and a second engine's connection would be left open.
            if self._lease_engine is None:
                self._lease_engine = make_postgres_engine(
                    self.engine.url.render_as_string(hide_password=False), pool_size=1
                )
            engine = self._lease_engine
        try:
            with engine.begin() as conn:
                yield conn
        finally:
            with self._lease_calls:
                self._lease_calls_in_flight -= 1
                self._lease_calls.notify_all()

    def dispose(self) -> None:
        """Close every pooled connection, the lease connection included, once a renewal
        call in flight (in a worker thread; its runs may have ended) returned its connection:
        a connection checked out while its pool is disposed is never closed, only dropped."""
        super().dispose()
        with self._lease_calls:
            self._lease_calls.wait_for(lambda: self._lease_calls_in_flight == 0, timeout=30)
        if self._lease_engine is not None:
            self._lease_engine.dispose()
        self._close_listener()

    def _fence_all(self, conn: Connection, params: Sequence[dict[str, Any]]) -> list[bool]:
        """All fenced updates of a batch in one round trip, each row's result read back
        (SQLAlchemy offers executemany with RETURNING only for INSERT)."""
        if len(params) < 2:
            return super()._fence_all(conn, params)
        ids = [p["b_id"] for p in params]
        if len(set(ids)) < len(ids):
            # One statement updates a row once: a saga written twice in one batch (a late
            # thread's record beside its own write) goes row by row, in order.
            return self._executemany(conn, self.sql.fence_write, params, returning=True)
        with _driver_cursor(conn) as cur:
            _by_key_only(conn, cur)
            cur.execute(self._arrays.fence_write, arrays(params, FENCE_COLUMNS))
            held = {row[0] for row in cur.fetchall()}
        return [i in held for i in ids]

    def _execute_many(self, conn: Connection, stmt: Any, rows: Sequence[dict[str, Any]]) -> None:
        if len(rows) < 2:
            super()._execute_many(conn, stmt, rows)
        else:
            self._executemany(conn, stmt, rows)

    def _executemany(
        self,
        conn: Connection,
        stmt: Any,
        rows: Sequence[dict[str, Any]],
        *,
        returning: bool = False,
    ) -> list[bool]:
        """``stmt`` for every parameter set in ``rows``, on the transaction's psycopg connection:
        one pipelined round trip, without SQLAlchemy's per-row work (the parameters are already
        plain values under their bind names). With ``returning``, whether each returned a row.
        """
        compiled, params = self._driver_params(stmt, rows)
        found: list[bool] = []
        with _driver_cursor(conn) as cur:
            cur.executemany(compiled.sql, params, returning=returning)
            while returning:
                found.append(cur.fetchone() is not None)
                if not cur.nextset():
                    break
        if returning and len(found) != len(rows):  # one result per row, or we misread them
            raise StorageError(f"postgresql: {len(found)} results for {len(rows)} rows")
        return found

    def _fetch_all(self, conn: Connection, stmt: Any, params: dict[str, Any]) -> Sequence[Any]:
        # A relay round reads a thousand rows: SQLAlchemy's per-row result processing would
        # cost more than the query (the columns are plain text, integers and floats).
        compiled, (values,) = self._driver_params(stmt, [params])
        with _driver_cursor(conn) as cur:
            cur.execute(compiled.sql, values)
            return cur.fetchall()

    def _take_seqs(
        self, conn: Connection, keys: Sequence[str], counts: Sequence[int]
    ) -> dict[str, int]:
        with _driver_cursor(conn) as cur:
            cur.execute(self._arrays.next_seqs, (list(keys), list(counts)))
            return dict(cur.fetchall())

    def _insert_events(
        self, conn: Connection, rows: Sequence[dict[str, Any]], *, ids: bool
    ) -> dict[str, int]:
        columns = arrays(rows, OUTBOX_ARRAY_COLUMNS)
        with _driver_cursor(conn) as cur:
            if not ids:
                cur.execute(self._arrays.insert_events, (rows[0]["b_ts"], *columns))
                return {}
            cur.execute(self._arrays.insert_events_ids, (rows[0]["b_ts"], *columns))
            return dict(cur.fetchall())

    def _insert_sagas(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> set[str]:
        ts = rows[0]["b_ts"]
        with _driver_cursor(conn) as cur:
            cur.execute(self._arrays.insert_sagas, (ts, ts, *arrays(rows, SAGA_ARRAY_COLUMNS)))
            return {sid for (sid,) in cur.fetchall()}

    def _insert_steps(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if len(rows) < 2:
            super()._insert_steps(conn, rows)
            return
        with _driver_cursor(conn) as cur:
            cur.execute(self._arrays.insert_steps, arrays(rows, STEP_INSERT_COLUMNS))

    def _update_steps(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        # One statement updates a row once: a step written twice in one batch (a late
        # thread's record beside the step's own) goes row by row, in order.
        if len(rows) < 2 or len({(r["b_id"], r["b_name"]) for r in rows}) < len(rows):
            super()._update_steps(conn, rows)
            return
        with _driver_cursor(conn) as cur:
            _by_key_only(conn, cur)
            cur.execute(self._arrays.update_steps, arrays(rows, STEP_UPDATE_COLUMNS))

    def _plan_by_key(self, conn: Connection) -> None:
        with _driver_cursor(conn) as cur:
            _by_key_only(conn, cur)

    def _now(self) -> ColumnElement[float]:
        return literal_column(_NOW)

    def _insert(self, table: Any) -> Insert:
        return pg_insert(table)

    def _in_list(self, column: Any, name: str) -> ColumnElement[bool]:
        # One array parameter instead of one per value: the statement's text is the same for
        # any number of values, so the driver caches and prepares it.
        return cast(
            "ColumnElement[bool]", column == any_(bindparam(name, type_=ARRAY(column.type)))
        )

    def _lock_claim(self, stmt: Select[Any]) -> Select[Any]:
        return stmt.with_for_update(skip_locked=True)

    def _lock_in_order(self, stmt: Select[Any]) -> Select[Any]:
        # COLLATE "C" (code point order): the order Python sorts a write batch's ids in,
        # whatever the database's collation.
        return stmt.order_by(self.tables.sagas.c.id.collate("C")).with_for_update()

    @contextlib.contextmanager
    def _migration_lock(self, conn: Connection) -> Iterator[None]:
        key = zlib.crc32(f"saga-outbox:{self.tables.version.fullname}".encode())
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        yield

    def _notify_outbox(self, conn: Connection) -> None:
        if self.notify:
            conn.execute(text("SELECT pg_notify(:c, '')"), {"c": self._channel})

    async def wait_for_outbox(self, timeout: float) -> bool:
        """Wait for a NOTIFY from a committing writer, at most ``timeout`` seconds."""
        if not self.notify:
            return await super().wait_for_outbox(timeout)
        try:
            limiter = self._listen_limiter.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(1)
            self._listen_limiter.set(limiter)
        deadline = time.monotonic() + timeout
        try:
            # In short slices: a waiting thread cannot be interrupted, and a relay being
            # stopped must not hang for a whole poll interval.
            while (left := deadline - time.monotonic()) > 0:
                if await anyio.to_thread.run_sync(self._wait, min(left, 0.25), limiter=limiter):
                    return True
            return False
        except psycopg.Error:
            self._close_listener()
            await anyio.sleep(timeout)  # the database is away: fall back to polling
            return False

    def _wait(self, timeout: float) -> bool:
        if self._listener is None:
            url = self.engine.url.set(drivername="postgresql")
            conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
            conn.execute(f'LISTEN "{self._channel}"')
            self._listener = conn
        return any(True for _ in self._listener.notifies(timeout=timeout, stop_after=1))

    def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(psycopg.Error):
                self._listener.close()
            self._listener = None

    def _set_statement_timeout(self, conn: Connection, seconds: float) -> None:
        conn.execute(text(f"SET LOCAL statement_timeout = {int(seconds * 1000)}"))

    def _map_error(self, exc: sa_exc.DBAPIError) -> Exception:
        return _storage_error(exc.orig)


#: The database clock in epoch seconds. clock_timestamp(), not now(): leases compare against
#: real time, not the transaction's start.
_NOW = "(extract(epoch from clock_timestamp()))::float8"


def _by_key_only(conn: Connection, cur: Any) -> None:
    """Plan this transaction's joins as nested loops over the primary key.

    The array updates (``_pg_arrays``) join a batch of a few hundred rows to the sagas or steps
    table by primary key; the relay's claims and the completions of its rounds and of
    optimistic publishes join a few hundred keys to the key and outbox tables. A table never
    analyzed, or grown since it was (a new deployment, a benchmark), is estimated at a few
    hundred rows, and the planner then hashes the whole table (a sequential scan on every
    batch: 7 ms instead of 2.6 ms for 200 step rows among 15,000; 8 ms instead of 1 to mark
    sent the events of 250 keys among 60,000, growing with the table). Each of these
    statements reads rows by key, so nothing in them gains from a hash or merge join.
    ``SET LOCAL``: until the transaction ends. Only our own statements follow it: in a
    transactional step's transaction the user's SQL has run before the saga's write, and
    ``append_outbox_many`` on a caller's connection never comes here.
    """
    tx = conn.get_transaction()
    if conn.info.get(_BY_KEY) is tx:
        return
    cur.execute(
        "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off;"
        " SET LOCAL enable_seqscan = off"
    )
    conn.info[_BY_KEY] = tx


_BY_KEY = "saga_by_key_only"


@contextlib.contextmanager
def _driver_cursor(conn: Connection) -> Iterator[psycopg.Cursor[Any]]:
    """A cursor on the transaction's own psycopg connection, for statements SQLAlchemy would
    slow down; failures are reported as SQLAlchemy's are."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        with driver.cursor() as cur:
            yield cur
    except psycopg.IntegrityError as exc:
        # As SQLAlchemy reports it, on either dialect: e.g. an event id stored already.
        raise sa_exc.IntegrityError("(batched statement)", None, exc) from exc
    except psycopg.Error as exc:
        # Not seen by SQLAlchemy: drop the connection ourselves if it is broken, and report
        # it as every storage failure is reported (the writers retry).
        if driver.closed or driver.broken:
            conn.invalidate()
        raise _storage_error(exc) from exc


def _storage_error(orig: BaseException | None) -> StorageError:
    """A driver failure as our own error, with its SQLSTATE (no URL or secret in it)."""
    sqlstate = getattr(orig, "sqlstate", None) or "?"
    return StorageError(f"postgresql storage failed ({sqlstate}): {type(orig).__name__}: {orig}")
