"""Fixtures for the engine contract tests: written once, run against every storage.

PostgreSQL tests each get a schema of their own (through ``search_path``), so tables created by
a test, ours or its own, never meet another test's.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from saga_brokers import InMemoryBroker
from saga_storage import SqlStorage, create_storage
from tests.support.services import require_server

PG_URL = os.environ.get(
    "SAGA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Makes URLs of new, empty databases of one dialect (removed after the test)."""
    schemas: list[str] = []
    admin = None
    if request.param == "postgresql":
        require_server("127.0.0.1", 5432, "PostgreSQL")
        admin = create_engine(PG_URL)

    def make() -> str:
        if admin is None:
            return f"sqlite:///{tmp_path / f'saga-{uuid.uuid4().hex[:8]}.db'}"
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        schemas.append(schema)
        return f"{PG_URL}?options=-csearch_path%3D{schema}"

    try:
        yield make
    finally:
        if admin is not None:
            with admin.begin() as conn:
                for schema in schemas:
                    conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()


@pytest.fixture
def storage_url(fresh_url: Callable[[], str]) -> str:
    return fresh_url()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema, for the few tests that need a real server session."""
    require_server("127.0.0.1", 5432, "PostgreSQL")
    admin = create_engine(PG_URL)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def storage(storage_url: str) -> Iterator[SqlStorage]:
    s = create_storage(storage_url)
    yield s
    s.dispose()


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()
