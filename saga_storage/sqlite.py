"""SQLite specifics: WAL, ``BEGIN IMMEDIATE`` writes, one writer at a time (DESIGN.md section 5).

A deferred transaction that later writes can fail with SQLITE_BUSY at once in WAL mode, ignoring
``busy_timeout``; starting every write with ``BEGIN IMMEDIATE`` makes writers queue instead.
Reads use plain deferred transactions so they never wait for a writer.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, literal_column
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ColumnElement

from saga_storage.repository import SqlStorage

MIN_SQLITE = (3, 35, 0)  # RETURNING and ON CONFLICT ... DO UPDATE
_READ = "saga_read"


def _check_version() -> None:
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise RuntimeError(
            f"SQLite {sqlite3.sqlite_version} is too old: saga-outbox needs "
            f"{'.'.join(map(str, MIN_SQLITE))} or newer (RETURNING)"
        )


def _enable_wal(cur: sqlite3.Cursor, busy_timeout: float) -> None:
    """Switch the file to WAL, waiting up to ``busy_timeout`` for other connections.

    SQLite answers "database is locked" at once, without its busy handler, when connections
    opening a new file switch it at the same moment (seen with four processes starting
    together), so the wait is ours.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def make_sqlite_engine(url: str, *, busy_timeout: float = 30.0) -> Engine:
    """An engine configured for WAL, full fsync, foreign keys and IMMEDIATE write transactions."""
    _check_version()
    parsed = make_url(url)
    memory = parsed.database in (None, "", ":memory:")
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": busy_timeout}}
    if memory:
        # One connection shared by every thread, else each connection would see its own database.
        kwargs["poolclass"] = StaticPool
    engine = create_engine(parsed, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        if not memory:
            _enable_wal(cur, busy_timeout)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(
            "BEGIN" if conn.get_execution_options().get(_READ) else "BEGIN IMMEDIATE"
        )

    return engine


class SqliteStorage(SqlStorage):
    """Storage in one SQLite file (the embedded default). One writer at a time; no SKIP LOCKED,
    so run one relay per file."""

    dialect = "sqlite"

    def __init__(self, engine: Engine, *, prefix: str = "saga_", memory: bool = False) -> None:
        # An in-memory database is one shared connection: serialise everything on one thread.
        super().__init__(engine, prefix=prefix, max_threads=1 if memory else 4)
        self._write_lock = threading.Lock()

    def _now(self) -> ColumnElement[float]:
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)")

    def _execute_many(self, conn: Connection, stmt: Any, rows: Sequence[dict[str, Any]]) -> None:
        """``stmt`` for every parameter set in ``rows`` on the transaction's sqlite3
        connection: SQLAlchemy's executemany costs more per row than SQLite's insert (the
        outbox rows and step records of every commit go through here)."""
        driver = conn.connection.driver_connection
        # One row, or another SQLite driver than sqlite3: SQLAlchemy's way.
        if len(rows) < 2 or not isinstance(driver, sqlite3.Connection):
            super()._execute_many(conn, stmt, rows)
            return
        compiled, params = self._driver_params(stmt, rows)
        values = [tuple([p[n] for n in compiled.names]) for p in params]  # "?" parameters
        cur = driver.cursor()
        try:
            cur.executemany(compiled.sql, values)
        except sqlite3.Error as exc:
            # The class SQLAlchemy would raise (IntegrityError for an id stored already,
            # OperationalError...): the application's own transaction may be the caller.
            raise sa_exc.DBAPIError.instance(
                "(batched statement)", None, exc, sqlite3.Error
            ) from exc
        finally:
            cur.close()

    def _insert(self, table: Any) -> Insert:
        return sqlite_insert(table)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        # Queue our own writers in-process (fair, no busy-polling); BEGIN IMMEDIATE plus
        # busy_timeout still orders us against other processes and application transactions.
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(**{_READ: True}) as conn:
            yield conn
