"""Storage for sagas and the outbox: SQLAlchemy Core on SQLite (embedded default) or PostgreSQL.

``create_storage(url)`` builds the storage for a SQLAlchemy URL (or ``$SAGA_DATABASE_URL``, or
``sqlite:///saga.db``) and creates or migrates its tables.
"""

from __future__ import annotations

import os
import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from saga_storage.repository import SqlStorage
from saga_storage.sqlite import SqliteStorage, make_sqlite_engine

__all__ = ["DEFAULT_DATABASE_URL", "SqlStorage", "SqliteStorage", "create_storage"]

DEFAULT_DATABASE_URL = "sqlite:///saga.db"


def create_storage(
    url: str | None = None,
    *,
    prefix: str = "saga_",
    schema: str | None = None,
    migrate: bool = True,
    notify: bool = False,
) -> SqlStorage:
    """Storage for the SQLAlchemy ``url`` (``sqlite:///file.db``, ``postgresql+psycopg://...``).

    Without a URL, ``$SAGA_DATABASE_URL`` or ``sqlite:///saga.db`` is used. Tables are named
    ``<prefix>sagas``, ``<prefix>outbox``... (in ``schema`` on PostgreSQL); ``migrate=False``
    skips creating or upgrading them. ``notify=True`` (PostgreSQL) makes every outbox write
    send a NOTIFY that wakes relays at once; it costs write throughput, polling stays the
    guarantee.
    Raises ``ValueError`` naming the problem for a malformed or unsupported URL.
    """
    url = url or os.environ.get("SAGA_DATABASE_URL") or DEFAULT_DATABASE_URL
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)  # never echo a password
        raise ValueError(
            f"invalid database URL {shown!r}: expected e.g. sqlite:///saga.db"
        ) from exc
    backend = parsed.get_backend_name()
    storage: SqlStorage
    if backend == "sqlite":
        if parsed.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise ValueError(
                f"unsupported SQLite driver {parsed.drivername!r}; use sqlite:///file.db"
            )
        if notify:
            raise ValueError("notify=True needs PostgreSQL; SQLite relays poll")
        memory = parsed.database in (None, "", ":memory:")
        if schema is not None:
            raise ValueError("SQLite has no schemas; use prefix= to separate table sets")
        storage = SqliteStorage(make_sqlite_engine(url), prefix=prefix, memory=memory)
    elif backend == "postgresql":
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "PostgreSQL storage needs psycopg 3; pip install 'saga-outbox[postgres]'"
            ) from exc
        from saga_storage.postgres import PostgresStorage, make_postgres_engine

        storage = PostgresStorage(
            make_postgres_engine(url), prefix=prefix, schema=schema, notify=notify
        )
    else:
        raise ValueError(
            f"unsupported database {backend!r} in {parsed.render_as_string(hide_password=True)!r}; "
            "supported: sqlite, postgresql"
        )
    if migrate:
        storage.migrate()
    return storage
