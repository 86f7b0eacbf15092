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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import Engine

from saga_storage.schema import Tables


class ArrayColumn(NamedTuple):
    """A column sent as one array: its name in the statement, its element type, and the
    repository's parameter (``b_<param>``) whose values fill it."""

    name: str
    kind: str
    param: str


def _columns(*specs: tuple[str, str] | tuple[str, str, str]) -> tuple[ArrayColumn, ...]:
    """Columns from ``(name, kind)`` (the parameter has the column's name) or
    ``(name, kind, param)``."""
    return tuple(
        ArrayColumn(*spec) if len(spec) == 3 else ArrayColumn(*spec, spec[0]) for spec in specs
    )


#: Outbox rows, in the order of a row tuple.
OUTBOX_ARRAY_COLUMNS = _columns(
    ("event_id", "text"),
    ("saga_id", "text"),
    ("topic", "text"),
    ("key", "text"),
    ("seq", "int8"),
    ("event_type", "text"),
    ("payload", "text"),
    ("headers", "text"),
)

#: New saga rows (``lease``: seconds from the database's now).
SAGA_ARRAY_COLUMNS = _columns(
    ("id", "text"),
    ("saga_type", "text"),
    ("definition_hash", "text"),
    ("status", "text"),
    ("input", "text"),
    ("lease_owner", "text", "owner"),
    ("lease_epoch", "int8", "epoch"),
    ("lease", "float8"),
)

#: New step rows.
STEP_INSERT_COLUMNS = _columns(
    ("saga_id", "text", "id"),
    ("name", "text"),
    ("position", "int4"),
    ("status", "text"),
    ("attempts", "int4"),
    ("started_at", "float8"),
)

#: Step records: the row's key, then every column a step write sets.
STEP_UPDATE_COLUMNS = _columns(
    ("saga_id", "text", "id"),
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


#: The fenced update of each write (``Statements.fence_write``), one array per parameter.
FENCE_COLUMNS = _columns(
    ("id", "text"),
    ("owner", "text"),
    ("epoch", "int8"),
    ("ts", "float8"),
    ("first_event", "text"),
    ("set_status", "bool"),
    ("release", "bool"),
    ("wake_in", "float8"),
    ("status", "text"),
    ("reason", "text"),
    ("failed_step", "text"),
    ("error_type", "text"),
    ("error_message", "text"),
    ("note", "text"),
)

#: The saga columns a write sets only with a status (``b_set_status``).
_STATUS_COLUMNS = ("status", "reason", "failed_step", "error_type", "error_message", "note")


def arrays(rows: Sequence[Mapping[str, Any]], columns: Sequence[ArrayColumn]) -> list[list[Any]]:
    """The statement's array parameters: per column, its parameter's value in every row.
    psycopg refuses a list mixing ``int`` and ``float`` (a lease of 30 beside one of 12.5),
    so the values of a ``float8`` column are made floats."""
    out = []
    for column in columns:
        values = [r[f"b_{column.param}"] for r in rows]
        if column.kind == "float8":
            values = [None if v is None else float(v) for v in values]
        out.append(values)
    return out


def _unnest(columns: Sequence[ArrayColumn]) -> str:
    """``unnest(%b::t1[], ...) AS u(c1, ...)``: one binary array parameter per column."""
    params = ", ".join(f"%b::{c.kind}[]" for c in columns)
    return f"unnest({params}) AS u({', '.join(c.name for c in columns)})"


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
    #: one array per column of :data:`FENCE_COLUMNS`; each saga at most once.
    #: Returns the ids whose fence held (their update was made).
    fence_write: str


def array_statements(engine: Engine, tables: Tables, now: str) -> ArrayStatements:
    """The statements for ``tables``, quoted for ``engine``'s dialect; ``now`` is the SQL of
    the database clock as epoch seconds (leases are measured on it)."""
    fmt = engine.dialect.identifier_preparer.format_table
    outbox, okey = fmt(tables.outbox), fmt(tables.outbox_key)
    sagas, steps = fmt(tables.sagas), fmt(tables.steps)
    saga_values = ", ".join(c.name for c in SAGA_ARRAY_COLUMNS[:-1])  # all but the lease
    step_names = ", ".join(c.name for c in STEP_INSERT_COLUMNS)
    step_sets = ", ".join(f"{c.name} = u.{c.name}" for c in STEP_UPDATE_COLUMNS[2:])
    names = ", ".join(c.name for c in OUTBOX_ARRAY_COLUMNS)
    status_sets = ", ".join(
        f"{c} = CASE WHEN u.set_status THEN u.{c} ELSE s.{c} END" for c in _STATUS_COLUMNS
    )
    insert = (
        f"INSERT INTO {outbox} ({names}, status, attempts, created_at)"
        f" SELECT {names}, 'PENDING', 0, %s::float8 FROM {_unnest(OUTBOX_ARRAY_COLUMNS)}"
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
        # Statements.fence_write for many sagas. The rows are locked in saga id order first
        # (as a lease renewal locks them, and as the same updates one by one in a sorted batch
        # did): an UPDATE's join locks in whatever order its plan reads them, which could
        # deadlock with a renewal. The lock query carries the batch's values along.
        fence_write=(
            f"WITH u AS (SELECT u.* FROM {_unnest(FENCE_COLUMNS)}"
            f" JOIN {sagas} AS l ON l.id = u.id"
            ' ORDER BY l.id COLLATE "C" FOR UPDATE OF l)'
            f" UPDATE {sagas} AS s SET version = s.version + 1, updated_at = u.ts, {status_sets},"
            " lease_owner = CASE WHEN u.release THEN NULL ELSE s.lease_owner END,"
            " lease_until = CASE WHEN u.release THEN NULL ELSE s.lease_until END,"
            f" wake_at = CASE WHEN u.wake_in IS NOT NULL THEN {now} + u.wake_in"
            " WHEN u.release THEN NULL ELSE s.wake_at END"
            " FROM u WHERE s.id = u.id AND s.lease_owner = u.owner AND s.lease_epoch = u.epoch"
            # A NULL first_event matches no row: no IS NULL test, so this stays an anti-join
            # (one index probe per write), not a subplan hashing the whole outbox.
            f" AND NOT EXISTS (SELECT 1 FROM {outbox} AS o WHERE o.event_id = u.first_event)"
            " RETURNING s.id"
        ),
    )
