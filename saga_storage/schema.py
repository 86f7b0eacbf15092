"""Table definitions, built for a configurable table-name prefix.

Timestamps are UTC epoch seconds in double-precision columns, computed by the database's clock
where it matters (leases), so both dialects compare them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

# Float(53) is DOUBLE PRECISION on PostgreSQL and REAL (8 bytes) on SQLite: microsecond epochs fit.
Timestamp = Float(53)


@dataclass(frozen=True)
class Tables:
    """The library's tables for one prefix."""

    metadata: MetaData
    sagas: Table
    steps: Table
    outbox: Table
    outbox_key: Table
    inbox: Table
    version: Table


def build_tables(prefix: str = "saga_", schema: str | None = None) -> Tables:
    """Define every table with names starting with ``prefix`` (in ``schema`` when given)."""
    md = MetaData(schema=schema)
    sagas = Table(
        f"{prefix}sagas",
        md,
        Column("id", String(255), primary_key=True),
        Column("saga_type", String(255), nullable=False),
        Column("definition_hash", String(64), nullable=False),
        Column("status", String(20), nullable=False),
        Column("reason", String(64)),
        Column("input", Text, nullable=False),
        Column("failed_step", String(255)),
        Column("error_type", String(255)),
        Column("error_message", Text),
        Column("note", Text),
        Column("lease_owner", String(255)),
        Column("lease_epoch", BigInteger, nullable=False, server_default=text("0")),
        Column("lease_until", Timestamp),
        Column("wake_at", Timestamp),
        Column("version", BigInteger, nullable=False, server_default=text("0")),
        Column("created_at", Timestamp, nullable=False),
        Column("updated_at", Timestamp, nullable=False),
    )
    Index(f"{prefix}sagas_status_idx", sagas.c.status, sagas.c.created_at)
    # Recovery scans only unsettled sagas: keep that index small as settled ones pile up.
    Index(
        f"{prefix}sagas_claim_idx",
        sagas.c.saga_type,
        sagas.c.lease_until,
        sqlite_where=sagas.c.status.in_(("PENDING", "RUNNING", "COMPENSATING")),
        postgresql_where=sagas.c.status.in_(("PENDING", "RUNNING", "COMPENSATING")),
    )
    steps = Table(
        f"{prefix}steps",
        md,
        Column(
            "saga_id",
            String(255),
            ForeignKey(sagas.c.id, ondelete="CASCADE"),
            primary_key=True,
        ),
        Column("name", String(255), primary_key=True),
        Column("position", Integer, nullable=False),
        Column("status", String(24), nullable=False),
        Column("outcome", String(16)),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        # Attempts that never reported back (the worker died or lost its lease mid-step).
        Column("crashes", Integer, nullable=False, server_default=text("0")),
        Column("result", Text),
        Column("error_type", String(255)),
        Column("error_message", Text),
        Column("compensation_attempts", Integer, nullable=False, server_default=text("0")),
        Column("compensation_error_type", String(255)),
        Column("compensation_error_message", Text),
        Column("started_at", Timestamp),
        Column("finished_at", Timestamp),
    )
    outbox = Table(
        f"{prefix}outbox",
        md,
        Column(
            "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        Column("event_id", String(64), nullable=False, unique=True),
        Column("saga_id", String(255)),
        Column("topic", String(255), nullable=False),
        Column("key", String(255), nullable=False),
        Column("seq", BigInteger, nullable=False),
        Column("event_type", String(255), nullable=False),
        Column("payload", Text, nullable=False),
        Column("headers", Text, nullable=False),
        Column("status", String(12), nullable=False),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("created_at", Timestamp, nullable=False),
        Column("sent_at", Timestamp),
        Column("last_error", Text),
        # Every event is updated once, when sent (``status``, ``sent_at``). Neither column is
        # indexed and each page keeps room, so PostgreSQL rewrites the row in its page and no
        # index (HOT update): sending costs a third less than with an index to update. Unsent
        # events are found through the key table (its partial index of keys with unsent
        # events) and each key's ``sent_seq`` (migration 2).
        postgresql_with={"fillfactor": 70},
    )
    Index(f"{prefix}outbox_key_seq_idx", outbox.c.key, outbox.c.seq, unique=True)
    outbox_key = Table(
        f"{prefix}outbox_key",
        md,
        Column("key", String(255), primary_key=True),
        Column("last_seq", BigInteger, nullable=False),
        Column("sent_seq", BigInteger, nullable=False, server_default=text("0")),
        Column("claim_token", String(64)),
        Column("claimed_until", Timestamp),
        Column("next_attempt_at", Timestamp),
        Column("blocked", Boolean, nullable=False, server_default=text("false")),
    )
    Index(
        f"{prefix}outbox_key_unsent_idx",
        outbox_key.c.key,
        sqlite_where=outbox_key.c.sent_seq < outbox_key.c.last_seq,
        postgresql_where=outbox_key.c.sent_seq < outbox_key.c.last_seq,
    )
    inbox = Table(
        f"{prefix}inbox",
        md,
        Column("consumer", String(255), primary_key=True),
        Column("message_id", String(255), primary_key=True),
        Column("received_at", Timestamp, nullable=False),
    )
    version = Table(
        f"{prefix}schema_version",
        md,
        Column("version", Integer, primary_key=True),
        Column("name", String(255), nullable=False),
        Column("applied_at", Timestamp, nullable=False),
    )
    return Tables(md, sagas, steps, outbox, outbox_key, inbox, version)
