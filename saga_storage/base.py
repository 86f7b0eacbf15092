"""Plumbing shared by the repositories: engine, tables, named statements, thread limiters,
dialect hooks, migrations and error mapping. Dialect subclasses fill in the hooks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar, cast

import anyio
from sqlalchemy import Connection, Engine, Select, bindparam
from sqlalchemy import exc as sa_exc
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ColumnElement

from saga_core._loop_local import LoopLocal
from saga_core.errors import StorageError
from saga_storage.coalesce import Coalescer, Pending
from saga_storage.migrations import MIGRATIONS, apply_pending
from saga_storage.schema import Tables, build_tables
from saga_storage.statements import Statements

T = TypeVar("T")


class DriverStatement(NamedTuple):
    """A statement compiled for sending on the driver's own cursor."""

    sql: str
    #: Parameter names in the order of the SQL's positional parameters (``?``); empty for a
    #: dialect with named parameters.
    names: tuple[str, ...]
    #: Values of the statement's own literals (``version + 1``, ``status = 'PENDING'``).
    literals: dict[str, Any]
    #: Bind processors by parameter name (e.g. Float's ``to_float``, Boolean's check).
    processors: dict[str, Callable[[Any], Any]]


class StorageBase:
    """Engine, tables and statements of one storage; the dialect hooks."""

    dialect: ClassVar[str] = ""
    #: Coalesced batches of saga writes in flight at once, each in its own transaction.
    parallel_flushes: ClassVar[int] = 1

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
            self.tables,
            now=self._now(),
            upsert_insert=self._insert,
            lock_claim=self._lock_claim,
            lock_in_order=self._lock_in_order,
            in_list=self._in_list,
        )
        #: Group concurrent saga writes into shared transactions (see saga_storage.coalesce).
        self.coalesce = True
        self._writes: Coalescer[Any] = Coalescer(
            f"saga_writes_{id(self)}",
            functools.partial(self._guarded, self._write_batch),  # driver errors mapped
            self._run,
            max_flushes=self.parallel_flushes,
        )
        # Completions of concurrent optimistic publishes (and relay rounds) likewise share
        # transactions: a saga's step publishes a key or two, and alone each costs a commit.
        self._completions: Coalescer[Any] = Coalescer(
            f"outbox_completions_{id(self)}",
            functools.partial(self._guarded, self._complete_batch),
            self._run,
        )
        self._max_threads = max_threads
        # One limiter per event loop: the same storage may serve several loops in turn (a sync
        # facade's loop thread, then an anyio.run of a script), and limiters are loop-bound.
        self._limiter = LoopLocal(
            f"saga_storage_{id(self)}", lambda: anyio.CapacityLimiter(self._max_threads)
        )
        # Lease renewals never wait behind a busy limiter either.
        self._lease_limiter = LoopLocal(f"saga_leases_{id(self)}", lambda: anyio.CapacityLimiter(1))
        # By id: the statements are attributes of this storage and live as long as it does.
        self._driver_statements: dict[int, DriverStatement] = {}

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

    def _lock_in_order(self, stmt: Select[Any]) -> Select[Any]:
        """Lock the saga rows ``stmt`` selects in id order, as coalesced writes do (nothing to
        do where the database locks as a whole)."""
        return stmt

    def _fetch_all(self, conn: Connection, stmt: Any, params: dict[str, Any]) -> Sequence[Any]:
        """Every row of ``stmt`` (a select of plain columns) as tuples; dialects may fetch
        a large result faster than SQLAlchemy's rows."""
        return conn.execute(stmt, params).all()

    def _plan_by_key(self, conn: Connection) -> None:
        """Have the rest of ``conn``'s transaction read rows by key, not scan whole tables
        (where a planner may misjudge a batch of keys against a table it has not analyzed)."""

    def _in_list(self, column: Any, name: str) -> ColumnElement[bool]:
        """``column`` is one of the values of the list bound as ``name``."""
        return cast("ColumnElement[bool]", column.in_(bindparam(name, expanding=True)))

    def _execute_many(self, conn: Connection, stmt: Any, rows: Sequence[dict[str, Any]]) -> None:
        """``stmt`` (no result rows) once per parameter set of ``rows``, in ``conn``'s
        transaction; dialects may send them faster than SQLAlchemy's executemany."""
        conn.execute(stmt, rows)

    # --- the driver's own cursor: batches without SQLAlchemy's per-row work -----------------
    def _driver_statement(self, stmt: Any) -> DriverStatement:
        """``stmt`` compiled for this engine's driver, once per statement."""
        cached = self._driver_statements.get(id(stmt))
        if cached is None:
            compiled = stmt.compile(dialect=self.engine.dialect)
            literals = {
                k: v
                for k, v in compiled.construct_params({}, _check=False).items()
                if not k.startswith("b_")
            }
            cached = self._driver_statements[id(stmt)] = DriverStatement(
                compiled.string,
                tuple(compiled.positiontup or ()),
                literals,
                dict(compiled._bind_processors),
            )
        return cached

    def _driver_params(
        self, stmt: Any, rows: Sequence[dict[str, Any]]
    ) -> tuple[DriverStatement, list[dict[str, Any]]]:
        """``stmt`` compiled for the driver, and each parameter set of ``rows`` as the driver
        takes it: the statement's own literals added, each value through its type's bind
        processor (the parameters are already plain values under their bind names)."""
        compiled = self._driver_statement(stmt)
        params = [{**compiled.literals, **r} for r in rows]
        for name, process in compiled.processors.items():
            for p in params:
                p[name] = process(p[name])
        return compiled, params

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
    def _write_batch(self, batch: list[Pending[Any]]) -> None:
        """Apply a batch of queued writes in one transaction (the saga repository's)."""
        raise NotImplementedError

    def _complete_batch(self, batch: list[Pending[Any]]) -> None:
        """Record queued publish results in shared transactions (the outbox repository's)."""
        raise NotImplementedError

    def _notify_outbox(self, conn: Connection) -> None:
        """Wake listening relays when this transaction commits (only where opted in)."""

    async def wait_for_outbox(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for new outbox events; True if woken early.

        Without notifications (SQLite, or PostgreSQL without ``notify=True``) it just sleeps:
        polling is the guarantee, a wake-up only shortens the wait.
        """
        await anyio.sleep(timeout)
        return False

    def _set_statement_timeout(self, conn: Connection, seconds: float) -> None:
        """Bound the statements of a transactional step (where the database can)."""

    def _map_error(self, exc: sa_exc.DBAPIError) -> Exception:
        """Turn a driver failure into our own error type (no URL or secret in the message)."""
        return StorageError(f"{self.dialect} storage failed: {type(exc.orig).__name__}: {exc.orig}")

    async def _run(self, fn: Callable[..., T], *args: Any, lease: bool = False) -> T:
        limiter = (self._lease_limiter if lease else self._limiter).get()
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

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    async def aclose(self) -> None:
        """Close every pooled connection (async form of :meth:`dispose`), once a lease
        renewal this event loop has in flight ended: the renewals outlive the runs they
        serve by up to one call, and would otherwise race the closing pool."""
        async with self._lease_limiter.get():  # held by a renewal call while it runs
            await self._run(self.dispose)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.engine.url.render_as_string(hide_password=True)!r})"
