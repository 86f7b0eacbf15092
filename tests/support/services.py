"""Reaching real servers from tests: skip locally when one is absent, fail under ``CI=true``.

CI must never pass by skipping, so a missing server there is an error, not a skip.
"""

from __future__ import annotations

import os
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(available: bool, what: str) -> None:
    """Skip the test (locally) or fail it (under CI) when ``what`` is not available."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is not available, and CI=true forbids skipping", pytrace=False)
    pytest.skip(f"{what} is not available")  # reached only outside CI: under CI it fails above


def require_server(host: str, port: int, what: str) -> None:
    """Skip or fail unless a server listens on ``host:port``."""
    require(port_open(host, port), f"{what} on {host}:{port}")


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
