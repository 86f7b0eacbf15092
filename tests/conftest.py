"""Shared fixtures: every async test runs under asyncio and under trio. Tests marked ``slow``
run first, so that with ``-n 2`` the two processes share them instead of one process ending
the run alone with the slowest (they used to be collected last)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow first
