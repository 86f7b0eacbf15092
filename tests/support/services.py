"""Reaching real servers from tests: skip locally when one is absent, fail under ``CI=true``.

CI must never pass by skipping, so a missing server there is an error, not a skip.
"""

from __future__ import annotations

import os
import random
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
    """A TCP port on the loopback interface that nobody uses right now, outside the kernel's
    ephemeral range.

    Servers the tests start are stopped and restarted on the same port (a broker outage). A
    port the kernel hands out for ``bind(0)`` comes from the ephemeral range, from which every
    outgoing connection (thousands here, to PostgreSQL, Redis, RabbitMQ) takes its local port
    too, and one could take it while the server is down. Two test processes drawing at once
    could also get the same port; a random draw from thousands makes that unlikely, and the
    bind below checks the port is free now.
    """
    low, high = _ephemeral_range()
    ports = range(10_000, low) if low - 10_000 >= 5_000 else range(high + 1, 65_536)
    for port in random.sample(ports, min(200, len(ports))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {ports}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default
