"""PostgreSQL statements that take a whole batch as one array per column (``unnest``).

A batch of outbox rows, new sagas or step records is then one statement with a fixed text
instead of one execution per row: psycopg converts each array in C, and the server parses,
plans and runs it once. The statements keep the rules of their SQLAlchemy twins in
``statements.py`` (same columns, same conflict handling); rows are inserted in array order, so
key rows are locked in the order the caller sorted them (DESIGN.md section 4: no two batched
writers deadlock on key rows). Step rows are only written after the fenced update locked
their saga's row, so the order their updates lock them in cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from saga_storage.schema import Tables

#: Outbox row columns sent as arrays, in the order of a row tuple, with their array types.
OUTBOX_ARRAY_COLUMNS = (
    ("event_id", "text"),
    ("saga_id", "text"),
    ("topic", "text"),
    ("key", "text"),
    ("seq", "int8"),
    ("event_type", "text"),
    ("payload", "text"),
    ("headers", "text"),
)


#: New saga rows: columns of the row tuple (the lease as seconds from now).
SAGA_ARRAY_COLUMNS = (
    ("id", "text"),
    ("saga_type", "text"),
    ("definition_hash", "text"),
    ("status", "text"),
    ("input", "text"),
    ("lease_owner", "text"),
    ("lease_epoch", "int8"),
    ("lease", "float8"),
)

#: New step rows.
STEP_INSERT_COLUMNS = (
    ("saga_id", "text"),
    ("name", "text"),
    ("position", "int4"),
    ("status", "text"),
    ("attempts", "int4"),
    ("started_at", "float8"),
)

#: Step records: the row's key, then every column a step write sets.
STEP_UPDATE_COLUMNS = (
    ("saga_id", "text"),
    ("name", "text"),
    ("status", "text"),
    ("outcome", "text"),
    ("attempts", "int4"),
    ("result", "text"),
    ("error_type", "text"),
    ("error_message", "text"),
    ("crashes", "int4"),
    ("compensation_attempts", "int4"),
    ("compensation_error_type", "text"),
    ("compensation_error_message", "text"),
    ("started_at", "float8"),
    ("finished_at", "float8"),
)


def _unnest(columns: tuple[tuple[str, str], ...]) -> str:
    """``unnest(%b::t1[], ...) AS u(c1, ...)``: one binary array parameter per column."""
    arrays = ", ".join(f"%b::{kind}[]" for _, kind in columns)
    return f"unnest({arrays}) AS u({', '.join(name for name, _ in columns)})"


@dataclass(frozen=True)
class ArrayStatements:
    """SQL text (psycopg placeholders) for batched outbox appends on one set of tables."""

    #: ``(keys, counts)`` -> rows ``(key, last_seq)``: each key takes its next ``n`` numbers.
    next_seqs: str
    #: ``created_at``, then one array per column of :data:`OUTBOX_ARRAY_COLUMNS`.
    insert_events: str
    #: the same, returning ``(event_id, id)`` of each row.
    insert_events_ids: str
    #: ``created_at`` and ``updated_at``, then one array per column of
    #: :data:`SAGA_ARRAY_COLUMNS`; returns the
    #: ids inserted (an id stored already is left alone, as ``Statements.insert_sagas``).
    insert_sagas: str
    #: one array per column of :data:`STEP_INSERT_COLUMNS`.
    insert_steps: str
    #: one array per column of :data:`STEP_UPDATE_COLUMNS`; each (saga, step) at most once.
    update_steps: str


def array_statements(engine: Engine, tables: Tables, now: str) -> ArrayStatements:
    """The statements for ``tables``, quoted for ``engine``'s dialect; ``now`` is the SQL of
    the database clock as epoch seconds (leases are measured on it)."""
    fmt = engine.dialect.identifier_preparer.format_table
    outbox, okey = fmt(tables.outbox), fmt(tables.outbox_key)
    sagas, steps = fmt(tables.sagas), fmt(tables.steps)
    saga_values = ", ".join(name for name, _ in SAGA_ARRAY_COLUMNS[:-1])
    step_names = ", ".join(name for name, _ in STEP_INSERT_COLUMNS)
    step_sets = ", ".join(f"{name} = u.{name}" for name, _ in STEP_UPDATE_COLUMNS[2:])
    names = ", ".join(name for name, _ in OUTBOX_ARRAY_COLUMNS)
    arrays = ", ".join(f"%b::{kind}[]" for _, kind in OUTBOX_ARRAY_COLUMNS)
    insert = (
        f"INSERT INTO {outbox} ({names}, status, attempts, created_at)"
        f" SELECT {names}, 'PENDING', 0, %s::float8 FROM unnest({arrays}) AS u({names})"
    )
    next_seqs = (
        f"INSERT INTO {okey} AS k (key, last_seq, sent_seq, blocked)"
        " SELECT key, n, 0, false FROM unnest(%b::text[], %b::int8[]) AS u(key, n)"
        " ON CONFLICT (key) DO UPDATE SET last_seq = k.last_seq + excluded.last_seq"
        " RETURNING key, last_seq"
    )
    return ArrayStatements(
        next_seqs=next_seqs,
        insert_events=insert,
        insert_events_ids=f"{insert} RETURNING event_id, id",
        insert_sagas=(
            f"INSERT INTO {sagas} ({saga_values}, lease_until, version, created_at, updated_at)"
            f" SELECT {saga_values}, {now} + lease, 0, %s::float8, %s::float8"
            f" FROM {_unnest(SAGA_ARRAY_COLUMNS)}"
            " ON CONFLICT (id) DO NOTHING RETURNING id"
        ),
        insert_steps=(
            f"INSERT INTO {steps} ({step_names}) SELECT {step_names}"
            f" FROM {_unnest(STEP_INSERT_COLUMNS)}"
        ),
        update_steps=(
            f"UPDATE {steps} AS s SET {step_sets} FROM {_unnest(STEP_UPDATE_COLUMNS)}"
            " WHERE s.saga_id = u.saga_id AND s.name = u.name"
        ),
    )
