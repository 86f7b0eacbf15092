"""Schema migrations: numbered, each applied in its own transaction, recorded in the version table.

The first migration creates the tables as they are now. A later change to the schema adds a
migration here (and freezes the DDL the earlier ones ran), never edits an applied one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from saga_storage.schema import Tables


@dataclass(frozen=True)
class Migration:
    """One schema change."""

    version: int
    name: str
    apply: Callable[[Connection, Tables], None]


def _initial(conn: Connection, tables: Tables) -> None:
    tables.metadata.create_all(
        conn,
        tables=[tables.sagas, tables.steps, tables.outbox, tables.outbox_key, tables.inbox],
    )
    # Frozen: the outbox indexes version 1 had, which the declared schema no longer has.
    outbox, prefix = _qualified(conn, tables.outbox), _prefix(tables)
    conn.exec_driver_sql(
        f"CREATE INDEX {prefix}outbox_pending_idx ON {outbox} (key, seq) WHERE status <> 'SENT'"
    )
    conn.exec_driver_sql(f"CREATE INDEX {prefix}outbox_sent_idx ON {outbox} (sent_at)")


def _sent_in_place(conn: Connection, tables: Tables) -> None:
    """Sending an event updates no index: the pending and sent-at indexes go (the relay finds
    unsent events through the key table; pruning walks ids), and on PostgreSQL each page of the
    outbox keeps room for the update (fillfactor 70: pages written from now on)."""
    prefix, schema = _prefix(tables), tables.outbox.schema
    for name in ("outbox_pending_idx", "outbox_sent_idx"):
        index = f"{schema}.{prefix}{name}" if schema else f"{prefix}{name}"
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {index}")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"ALTER TABLE {_qualified(conn, tables.outbox)} SET (fillfactor = 70)")


def _prefix(tables: Tables) -> str:
    return tables.outbox.name[: -len("outbox")]


def _qualified(conn: Connection, table: Any) -> str:
    return conn.dialect.identifier_preparer.format_table(table)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial tables", _initial),
    Migration(2, "outbox rows sent in place", _sent_in_place),
)


def applied_versions(conn: Connection, tables: Tables) -> set[int]:
    """Versions recorded in the version table (which must exist)."""
    return set(conn.execute(select(tables.version.c.version)).scalars())


def apply_pending(conn: Connection, tables: Tables, migration: Migration) -> bool:
    """Apply ``migration`` in the caller's transaction unless it is recorded; True if applied."""
    if migration.version in applied_versions(conn, tables):
        return False
    migration.apply(conn, tables)
    conn.execute(
        tables.version.insert().values(
            version=migration.version, name=migration.name, applied_at=time.time()
        )
    )
    return True


def latest_version() -> int:
    """The schema version this code expects."""
    return MIGRATIONS[-1].version
