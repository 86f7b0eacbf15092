"""Fixtures for the engine contract tests: written once, run against every storage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from saga_brokers import InMemoryBroker
from saga_storage import SqlStorage, create_storage


@pytest.fixture(params=["sqlite"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'saga.db'}"


@pytest.fixture
def storage(storage_url: str) -> Iterator[SqlStorage]:
    s = create_storage(storage_url)
    yield s
    s.dispose()


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()
