"""Schema creation: migrations equal the declared schema, and concurrent starters are safe."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, inspect, select
from sqlalchemy.engine import Engine

from saga_storage import create_storage
from saga_storage.migrations import latest_version
from saga_storage.schema import build_tables
from tests.support.threads import run_threads


def _describe(engine: Engine) -> dict[str, Any]:
    insp = inspect(engine)
    out: dict[str, Any] = {}
    for table in sorted(insp.get_table_names()):
        out[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in insp.get_columns(table)
            ],
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in insp.get_indexes(table)
            ),
            "fks": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                for f in insp.get_foreign_keys(table)
            ),
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
        }
    return out


def test_migrations_equal_the_declared_schema(fresh_url: Callable[[], str]) -> None:
    migrated_url, declared_url = fresh_url(), fresh_url()
    migrated = create_storage(migrated_url)  # runs every migration in order
    declared = create_engine(declared_url)
    build_tables().metadata.create_all(declared)
    try:
        assert _describe(migrated.engine) == _describe(declared)
        assert "saga_sagas" in _describe(declared)
    finally:
        migrated.dispose()
        declared.dispose()


def test_migrate_is_idempotent_and_records_versions(storage_url: str) -> None:
    first = create_storage(storage_url)
    assert first.migrate() == 0  # create_storage already applied everything
    with first.engine.connect() as conn:
        versions = conn.execute(select(first.tables.version.c.version)).scalars().all()
    assert versions == list(range(1, latest_version() + 1))
    first.dispose()


def test_concurrent_starters_migrate_once(fresh_url: Callable[[], str]) -> None:
    """Four starters at once on a new database, several times over (on SQLite a new file is
    switched to WAL by all of them at the same moment, which SQLite refuses at once instead of
    waiting: it failed about one round in ten before the storage waited itself)."""
    first = fresh_url()
    rounds = 20 if first.startswith("sqlite") else 3
    for url in [first, *(fresh_url() for _ in range(rounds - 1))]:
        assert run_threads(lambda _, url=url: create_storage(url).dispose(), 4) == []
        storage = create_storage(url, migrate=False)
        with storage.engine.connect() as conn:
            versions = conn.execute(select(storage.tables.version.c.version)).scalars().all()
        assert versions == list(range(1, latest_version() + 1))
        storage.dispose()


def test_table_prefix_separates_table_sets(storage_url: str) -> None:
    a = create_storage(storage_url, prefix="app_a_")
    b = create_storage(storage_url, prefix="app_b_")
    names = set(inspect(a.engine).get_table_names())
    assert {"app_a_sagas", "app_b_sagas", "app_a_outbox", "app_b_schema_version"} <= names
    a.dispose()
    b.dispose()


def test_a_version_1_outbox_upgrades_to_the_declared_schema(fresh_url: Callable[[], str]) -> None:
    """Migration 2 drops the outbox's pending and sent-at indexes and, on PostgreSQL, leaves
    room in each page (fillfactor 70): a database made by version 1 ends as a fresh one."""
    from saga_storage.migrations import MIGRATIONS, apply_pending

    upgraded_url, declared_url = fresh_url(), fresh_url()
    engine = create_engine(upgraded_url)
    tables = build_tables()
    with engine.begin() as conn:
        tables.metadata.create_all(conn, tables=[tables.version])
        assert apply_pending(conn, tables, MIGRATIONS[0])
    indexes = {i[0] for i in _describe(engine)["saga_outbox"]["indexes"]}
    assert {"saga_outbox_pending_idx", "saga_outbox_sent_idx"} <= indexes
    engine.dispose()
    upgraded = create_storage(upgraded_url)  # applies what is left: migration 2
    declared = create_engine(declared_url)
    build_tables().metadata.create_all(declared)
    try:
        with upgraded.engine.connect() as conn:
            versions = set(conn.execute(select(upgraded.tables.version.c.version)).scalars())
        assert versions == {1, 2}
        assert _describe(upgraded.engine) == _describe(declared)
        if upgraded.engine.dialect.name == "postgresql":
            for engine_ in (upgraded.engine, declared):
                with engine_.connect() as conn:
                    options = conn.exec_driver_sql(
                        "SELECT reloptions FROM pg_class WHERE oid = 'saga_outbox'::regclass"
                    ).scalar()
                assert options == ["fillfactor=70"]
    finally:
        upgraded.dispose()
        declared.dispose()
