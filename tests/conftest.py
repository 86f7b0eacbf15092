"""Shared fixtures: every async test runs under asyncio and under trio. Tests marked ``slow``
run first, so that with ``-n 2`` the two processes share them instead of one process ending
the run alone with the slowest (they used to be collected last)."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow first


def _tolerates_socket_leaks(item: pytest.Item) -> bool:
    return any(
        "unclosed <socket.socket" in str(arg)
        for mark in item.iter_markers("filterwarnings")
        for arg in mark.args
    )


@pytest.fixture(autouse=True)
def _collect_tolerated_socket_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Where a test tolerates a client library's leaked sockets (kafka-python's failed
    connection attempts, see tests/brokers/conftest.py), collect them before the test ends.
    Left to the collector, they were closed, with their ResourceWarning, in whatever test of
    the same process ran next, which tolerates nothing, and failed it."""
    yield
    if _tolerates_socket_leaks(request.node):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "unclosed <socket.socket", ResourceWarning)
            gc.collect()
