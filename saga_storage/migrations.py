"""Schema migrations: numbered, each applied in its own transaction, recorded in the version table.

The first migration creates the tables as they are now. A later change to the schema adds a
migration here (and freezes the DDL the earlier ones ran), never edits an applied one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

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


MIGRATIONS: tuple[Migration, ...] = (Migration(1, "initial tables", _initial),)


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
