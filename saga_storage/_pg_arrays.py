"""PostgreSQL statements that take a whole batch as one array per column (``unnest``).

A batch of outbox rows is then one statement with a fixed text instead of one execution per
row: psycopg converts each array in C, and the server parses, plans and runs it once. The
statements keep the rules of their SQLAlchemy twins in ``statements.py`` (same columns, same
conflict handling); rows are inserted in array order, so key rows are locked in the order
the caller sorted them (DESIGN.md section 4: no two batched writers deadlock on key rows).
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


@dataclass(frozen=True)
class ArrayStatements:
    """SQL text (psycopg placeholders) for batched outbox appends on one set of tables."""

    #: ``(keys, counts)`` -> rows ``(key, last_seq)``: each key takes its next ``n`` numbers.
    next_seqs: str
    #: ``created_at``, then one array per column of :data:`OUTBOX_ARRAY_COLUMNS`.
    insert_events: str
    #: the same, returning ``(event_id, id)`` of each row.
    insert_events_ids: str


def array_statements(engine: Engine, tables: Tables) -> ArrayStatements:
    """The statements for ``tables``, quoted for ``engine``'s dialect."""
    fmt = engine.dialect.identifier_preparer.format_table
    outbox, okey = fmt(tables.outbox), fmt(tables.outbox_key)
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
    )
