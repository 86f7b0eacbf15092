"""Fixtures for the engine contract tests: written once, run against every storage.

PostgreSQL tests each get a schema of their own (through ``search_path``), so tables created by
a test, ours or its own, never meet another test's.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
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
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'saga.db'}"
        return
    require_server("127.0.0.1", 5432, "PostgreSQL")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
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
