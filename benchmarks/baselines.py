"""The limits our numbers are measured against, in the same run and on the same services.

- **Raw broker publish**: the same messages, in batches of the size one relay round publishes,
  sent with the same client library and acknowledgement settings as our adapter, but without
  our code (kafka-python ``send`` + ``flush`` with ``acks="all"`` and idempotence; redis-py
  pipelined ``XADD``; aio-pika with publisher confirms and ``mandatory``, all of a batch in
  flight at once). The memory broker has no client: its "raw" rate is our adapter's
  ``publish`` called directly.
- **Raw database insert-then-drain**: the same rows in a table with the same columns and
  indexes as ``saga_outbox``, inserted with the plain driver (psycopg 3 / sqlite3,
  ``executemany``, one transaction per commit batch), then drained as a relay must at least:
  per round, read a batch of unsent rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and mark
  them sent, one transaction. It keeps no per-key sequence table: that cost is ours.
- **Raw database, keyed** (the least our design allows): the same with the per-key table of
  DESIGN.md section 4, in plain SQL: per commit batch one pipelined upsert per key
  (``last_seq = last_seq + n RETURNING``) and one ``executemany`` of rows; per relay round two
  transactions as the relay must (claim keys ``SKIP LOCKED`` and read their events; after the
  publish, advance ``sent_seq`` and mark the rows sent).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import anyio

from benchmarks._measure import Meter, rate
from benchmarks._servers import (
    REDIS_URL,
    BrokerTarget,
    Database,
    bind_rabbit_queue,
    run_asyncio,
)
from saga_core.events import Message

# --- raw broker ---------------------------------------------------------------------------


def retarget(messages: Sequence[Message], topic: str) -> list[Message]:
    """The same messages on another topic (the baseline's own)."""
    return [Message(topic, m.key, m.value, dict(m.headers)) for m in messages]


async def raw_broker_rate(
    target: BrokerTarget, messages: Sequence[Message], batch: int
) -> dict[str, Any]:
    """Publish ``messages`` in batches of ``batch`` with the bare client; rate and CPU."""
    topic = target.new_topic("raw")
    msgs = retarget(messages, topic)
    if target.kind == "memory":
        from saga_brokers import InMemoryBroker

        broker = InMemoryBroker()
        await broker.publish(msgs[:1])
        with Meter() as m:
            for s in range(0, len(msgs), batch):
                results = await broker.publish(msgs[s : s + batch])
                assert all(r is None for r in results)
        client = "InMemoryBroker.publish (no client library)"
    elif target.kind == "kafka":
        m = await anyio.to_thread.run_sync(_kafka_raw, target, msgs, batch)
        client = "kafka-python KafkaProducer, acks=all, idempotent; send x batch, flush"
    elif target.kind == "redis":
        m = await anyio.to_thread.run_sync(_redis_raw, msgs, batch)
        client = "redis-py pipeline of XADD per batch"
    elif target.kind == "rabbitmq":
        await anyio.to_thread.run_sync(run_asyncio, lambda: bind_rabbit_queue(target, topic))
        m = await anyio.to_thread.run_sync(run_asyncio, lambda: _rabbit_raw(msgs, batch))
        client = "aio-pika, publisher confirms, mandatory, persistent; a batch in flight at once"
    else:
        raise ValueError(target.kind)
    span = m.span
    return {
        "client": client,
        "messages": len(msgs),
        "batch": batch,
        "rate": rate(len(msgs), span.wall),
        "cpu_cores": span.cpu_cores,
    }


def _kafka_raw(target: BrokerTarget, msgs: list[Message], batch: int) -> Meter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from kafka import KafkaProducer

    bootstrap = target.url.split("://", 1)[1].split("?", 1)[0]
    producer = KafkaProducer(
        bootstrap_servers=[bootstrap],
        acks="all",
        enable_idempotence=True,
        request_timeout_ms=10000,
        max_block_ms=10000,
    )
    try:
        first = msgs[0]
        producer.send(first.topic, key=b"warm-up", value=b"{}").get(10)
        with Meter() as m:
            for s in range(0, len(msgs), batch):
                futures = [
                    producer.send(
                        x.topic,
                        key=x.key.encode(),
                        value=x.value,
                        headers=[(k, v.encode()) for k, v in x.headers.items()],
                    )
                    for x in msgs[s : s + batch]
                ]
                producer.flush(timeout=10)
                for f in futures:
                    if not f.is_done or f.exception is not None:
                        raise RuntimeError(f"raw Kafka publish failed: {f.exception}")
        return m
    finally:
        producer.close(timeout=5)


def _redis_raw(msgs: list[Message], batch: int) -> Meter:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=10)
    try:
        client.ping()
        with Meter() as m:
            for s in range(0, len(msgs), batch):
                pipe = client.pipeline(transaction=False)
                for x in msgs[s : s + batch]:
                    pipe.xadd(
                        x.topic,
                        {
                            "key": x.key.encode(),
                            "value": x.value,
                            "headers": json.dumps(dict(x.headers), separators=(",", ":")),
                        },
                    )
                pipe.execute()
        return m
    finally:
        client.close()


async def _rabbit_raw(msgs: list[Message], batch: int) -> Meter:
    import aio_pika

    from benchmarks._servers import RABBIT_URL

    connection = await aio_pika.connect(RABBIT_URL, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            msgs[0].topic, aio_pika.ExchangeType.TOPIC, durable=True
        )
        with Meter() as m:
            for s in range(0, len(msgs), batch):
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(
                                x.value,
                                headers=dict(x.headers),
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                message_id=x.headers.get("event_id"),
                            ),
                            routing_key=x.headers.get("event_type", ""),
                            mandatory=True,
                        )
                        for x in msgs[s : s + batch]
                    )
                )
        return m


# --- raw database -------------------------------------------------------------------------

_PG_TABLE = """
CREATE TABLE raw_outbox (
    id bigserial PRIMARY KEY,
    event_id varchar(64) NOT NULL UNIQUE,
    saga_id varchar(255),
    topic varchar(255) NOT NULL,
    key varchar(255) NOT NULL,
    seq bigint NOT NULL,
    event_type varchar(255) NOT NULL,
    payload text NOT NULL,
    headers text NOT NULL,
    status varchar(12) NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    created_at double precision NOT NULL,
    sent_at double precision,
    last_error text
)"""
_SQLITE_TABLE = _PG_TABLE.replace("bigserial PRIMARY KEY", "INTEGER PRIMARY KEY AUTOINCREMENT")
_INDEXES = (
    "CREATE UNIQUE INDEX raw_outbox_key_seq ON raw_outbox (key, seq)",
    "CREATE INDEX raw_outbox_pending ON raw_outbox (key, seq) WHERE status <> 'SENT'",
    "CREATE INDEX raw_outbox_sent ON raw_outbox (sent_at)",
)
_INSERT = (
    "INSERT INTO raw_outbox (event_id, saga_id, topic, key, seq, event_type, payload, headers,"
    " status, created_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, 'PENDING', {p})"
)
_SELECT = (
    "SELECT id, topic, key, seq, payload, headers FROM raw_outbox WHERE status <> 'SENT'"
    " ORDER BY key, seq LIMIT {limit}"
)


def raw_rows(messages: Sequence[Message], seqs: Sequence[int]) -> list[tuple[Any, ...]]:
    """The rows our outbox would hold for ``messages`` (seq numbers given)."""
    now = time.time()
    return [
        (
            str(uuid.uuid4()),
            None,
            m.topic,
            m.key,
            seq,
            m.headers.get("event_type", ""),
            m.value.decode(),
            json.dumps(dict(m.headers)),
            now,
        )
        for m, seq in zip(messages, seqs, strict=True)
    ]


def raw_db_rate(
    db: Database, rows: Sequence[tuple[Any, ...]], commit_batch: int, drain_batch: int
) -> dict[str, Any]:
    """Insert ``rows`` (one transaction per ``commit_batch``), then drain them; rates and CPU.
    Both variants: without a key table (``*_rate``) and keyed (``keyed_*``)."""
    if db.kind == "postgresql":
        ins, drain, drained = _pg_raw(db, rows, commit_batch, drain_batch)
        k_ins, k_drain, k_drained = _pg_keyed(db, rows, commit_batch)
    else:
        ins, drain, drained = _sqlite_raw(db, rows, commit_batch, drain_batch)
        k_ins, k_drain, k_drained = _sqlite_keyed(db, rows, commit_batch)
    if drained != len(rows) or k_drained != len(rows):
        raise RuntimeError(f"raw drains saw {drained} and {k_drained} rows of {len(rows)}")
    n = len(rows)
    return {
        "rows": n,
        "commit_batch": commit_batch,
        "drain_batch": drain_batch,
        "insert_rate": rate(n, ins.span.wall),
        "drain_rate": rate(n, drain.span.wall),
        "insert_then_drain_rate": rate(n, ins.span.wall + drain.span.wall),
        "drain_cpu_cores": drain.span.cpu_cores,
        "keyed_insert_rate": rate(n, k_ins.span.wall),
        "keyed_drain_rate": rate(n, k_drain.span.wall),
        "keyed_insert_then_drain_rate": rate(n, k_ins.span.wall + k_drain.span.wall),
    }


_KEY_TABLE = """
CREATE TABLE raw_key (
    key varchar(255) PRIMARY KEY,
    last_seq bigint NOT NULL,
    sent_seq bigint NOT NULL DEFAULT 0,
    claim_token varchar(64),
    claimed_until double precision,
    next_attempt_at double precision,
    blocked boolean NOT NULL DEFAULT false
)"""
_KEY_INDEX = "CREATE INDEX raw_key_unsent ON raw_key (key) WHERE sent_seq < last_seq"
_UPSERT = (
    "INSERT INTO raw_key (key, last_seq) VALUES ({p}, {p}) ON CONFLICT (key) DO UPDATE"
    " SET last_seq = raw_key.last_seq + excluded.last_seq RETURNING last_seq"
)
_CLAIMABLE = (
    "SELECT key FROM raw_key WHERE sent_seq < last_seq AND NOT blocked"
    " AND (claimed_until IS NULL OR claimed_until < {p}) LIMIT {p}"
)
_CLAIM = "UPDATE raw_key SET claim_token = {p}, claimed_until = {p} WHERE key = {p}"
_EVENTS = (
    "SELECT o.id, o.topic, o.key, o.seq, o.payload, o.headers FROM raw_outbox o"
    " JOIN raw_key k ON k.key = o.key WHERE k.claim_token = {p} AND o.seq > k.sent_seq"
    " ORDER BY o.key, o.seq"
)
_ADVANCE = (
    "UPDATE raw_key SET sent_seq = {p}, claim_token = NULL, claimed_until = NULL"
    " WHERE key = {p} AND claim_token = {p}"
)
_MARK = (
    "UPDATE raw_outbox SET status = 'SENT', sent_at = {p} WHERE key = {p} AND seq <= {p}"
    " AND status <> 'SENT'"
)


def _key_groups(batch: Sequence[tuple[Any, ...]]) -> list[tuple[str, int]]:
    """(key, how many events) for a batch, keys in first-seen order."""
    counts: dict[str, int] = {}
    for r in batch:
        counts[r[3]] = counts.get(r[3], 0) + 1
    return list(counts.items())


def _with_seqs(
    batch: Sequence[tuple[Any, ...]], last: dict[str, int], groups: list[tuple[str, int]]
) -> list[tuple[Any, ...]]:
    """The batch's rows numbered per key, ending at each key's new ``last_seq``."""
    nxt = {k: last[k] - n + 1 for k, n in groups}
    out = []
    for r in batch:
        seq = nxt[r[3]]
        nxt[r[3]] = seq + 1
        out.append((*r[:4], seq, *r[5:]))
    return out


def _pg_keyed(
    db: Database, rows: Sequence[tuple[Any, ...]], commit_batch: int
) -> tuple[Meter, Meter, int]:
    import psycopg

    with psycopg.connect(db.libpq) as conn:
        conn.execute(f"SET search_path TO {db.schema}")
        conn.execute(_PG_TABLE)
        for ddl in (*_INDEXES, _KEY_TABLE, _KEY_INDEX):
            conn.execute(ddl)
        conn.commit()
        upsert, insert = _UPSERT.format(p="%s"), _INSERT.format(p="%s")
        with Meter() as ins:
            for s in range(0, len(rows), commit_batch):
                batch = rows[s : s + commit_batch]
                groups = _key_groups(batch)
                with conn.cursor() as cur:
                    cur.executemany(upsert, groups, returning=True)
                    seqs = []
                    while True:
                        seqs.append(int(cur.fetchone()[0]))  # type: ignore[index]
                        if not cur.nextset():
                            break
                    last = {k: seq for (k, _), seq in zip(groups, seqs, strict=True)}
                    cur.executemany(insert, _with_seqs(batch, last, groups))
                conn.commit()
        claimable = _CLAIMABLE.format(p="%s") + " FOR UPDATE SKIP LOCKED"
        claim, events = _CLAIM.format(p="%s"), _EVENTS.format(p="%s")
        advance, mark = _ADVANCE.format(p="%s"), _MARK.format(p="%s")
        drained = 0
        with Meter() as drain:
            while True:
                token = uuid.uuid4().hex
                with conn.cursor() as cur:  # claim: keys, then their events
                    keys = [r[0] for r in cur.execute(claimable, (time.time(), 100)).fetchall()]
                    if keys:
                        cur.executemany(claim, [(token, time.time() + 30, k) for k in keys])
                        got = cur.execute(events, (token,)).fetchall()
                conn.commit()
                if not keys:
                    break
                sent = _last_per_key(got)
                with conn.cursor() as cur:  # after the publish: advance and mark sent
                    cur.executemany(advance, [(seq, k, token) for k, seq in sent.items()])
                    now = time.time()
                    cur.executemany(mark, [(now, k, seq) for k, seq in sent.items()])
                conn.commit()
                drained += len(got)
        for table in ("raw_outbox", "raw_key"):
            conn.execute(f"DROP TABLE {table}")
        conn.commit()
    return ins, drain, drained


def _last_per_key(events: Sequence[Any]) -> dict[str, int]:
    last: dict[str, int] = {}
    for r in events:
        last[r[2]] = max(int(r[3]), last.get(r[2], 0))
    return last


def _sqlite_keyed(
    db: Database, rows: Sequence[tuple[Any, ...]], commit_batch: int
) -> tuple[Meter, Meter, int]:
    assert db.path is not None
    conn = sqlite3.connect(db.path.with_name("raw-keyed.db"), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(_SQLITE_TABLE)
        for ddl in (*_INDEXES, _KEY_TABLE, _KEY_INDEX):
            conn.execute(ddl)
        upsert, insert = _UPSERT.format(p="?"), _INSERT.format(p="?")
        with Meter() as ins:
            for s in range(0, len(rows), commit_batch):
                batch = rows[s : s + commit_batch]
                groups = _key_groups(batch)
                conn.execute("BEGIN IMMEDIATE")
                last = {k: int(conn.execute(upsert, (k, n)).fetchone()[0]) for k, n in groups}
                conn.executemany(insert, _with_seqs(batch, last, groups))
                conn.execute("COMMIT")
        claimable = _CLAIMABLE.format(p="?")
        claim, events = _CLAIM.format(p="?"), _EVENTS.format(p="?")
        advance, mark = _ADVANCE.format(p="?"), _MARK.format(p="?")
        drained = 0
        with Meter() as drain:
            while True:
                token = uuid.uuid4().hex
                conn.execute("BEGIN IMMEDIATE")
                keys = [r[0] for r in conn.execute(claimable, (time.time(), 100)).fetchall()]
                got: list[Any] = []
                if keys:
                    conn.executemany(claim, [(token, time.time() + 30, k) for k in keys])
                    got = conn.execute(events, (token,)).fetchall()
                conn.execute("COMMIT")
                if not keys:
                    break
                sent = _last_per_key(got)
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(advance, [(seq, k, token) for k, seq in sent.items()])
                now = time.time()
                conn.executemany(mark, [(now, k, seq) for k, seq in sent.items()])
                conn.execute("COMMIT")
                drained += len(got)
    finally:
        conn.close()
    return ins, drain, drained


def _pg_raw(
    db: Database, rows: Sequence[tuple[Any, ...]], commit_batch: int, drain_batch: int
) -> tuple[Meter, Meter, int]:
    import psycopg

    with psycopg.connect(db.libpq) as conn:
        conn.execute(f"SET search_path TO {db.schema}")
        conn.execute(_PG_TABLE)
        for ddl in _INDEXES:
            conn.execute(ddl)
        conn.commit()
        insert = _INSERT.format(p="%s")
        select = _SELECT.format(limit="%s") + " FOR UPDATE SKIP LOCKED"
        with Meter() as ins:
            for s in range(0, len(rows), commit_batch):
                with conn.cursor() as cur:
                    cur.executemany(insert, rows[s : s + commit_batch])
                conn.commit()
        drained = 0
        with Meter() as drain:
            while True:
                with conn.cursor() as cur:
                    got = cur.execute(select, (drain_batch,)).fetchall()
                    if got:
                        cur.execute(
                            "UPDATE raw_outbox SET status = 'SENT', sent_at = %s"
                            " WHERE id = ANY(%s)",
                            (time.time(), [r[0] for r in got]),
                        )
                conn.commit()
                if not got:
                    break
                drained += len(got)
        conn.execute("DROP TABLE raw_outbox")
        conn.commit()
    return ins, drain, drained


def _sqlite_raw(
    db: Database, rows: Sequence[tuple[Any, ...]], commit_batch: int, drain_batch: int
) -> tuple[Meter, Meter, int]:
    assert db.path is not None
    path = db.path.with_name("raw.db")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        # The same settings as our SQLite storage: WAL, full fsync, IMMEDIATE writes.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(_SQLITE_TABLE)
        for ddl in _INDEXES:
            conn.execute(ddl)
        insert = _INSERT.format(p="?")
        select = _SELECT.format(limit="?")
        with Meter() as ins:
            for s in range(0, len(rows), commit_batch):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(insert, rows[s : s + commit_batch])
                conn.execute("COMMIT")
        drained = 0
        with Meter() as drain:
            while True:
                conn.execute("BEGIN IMMEDIATE")
                got = conn.execute(select, (drain_batch,)).fetchall()
                if got:
                    ids = [r[0] for r in got]
                    marks = ",".join("?" * len(ids))
                    conn.execute(
                        f"UPDATE raw_outbox SET status = 'SENT', sent_at = ? WHERE id IN ({marks})",
                        (time.time(), *ids),
                    )
                conn.execute("COMMIT")
                if not got:
                    break
                drained += len(got)
    finally:
        conn.close()
    return ins, drain, drained
