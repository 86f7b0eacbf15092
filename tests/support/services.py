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
    ephemeral range, and in this test process's own share of the ports.

    Servers the tests start are stopped and restarted on the same port (a broker outage). A
    port the kernel hands out for ``bind(0)`` comes from the ephemeral range, from which every
    outgoing connection (thousands here, to PostgreSQL, Redis, RabbitMQ) takes its local port
    too, and one could take it while the server is down. Each pytest-xdist worker draws from
    a slice of its own, so that another worker cannot draw a port whose server is down for
    an outage test; the bind checks that nothing else uses it now.
    """
    ports = _own_slice(_unused_by_the_kernel())
    for port in random.sample(ports, min(200, len(ports))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # none free in our slice: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Workers share the ports this many ways (``-n`` above it: some share a slice).
_SLICES = 8


def _own_slice(ports: range) -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = len(ports) // _SLICES
    if size < 100:
        return ports
    first = ports.start + (index % _SLICES) * size
    return range(first, first + size)


def _unused_by_the_kernel() -> range:
    """The larger of the port ranges below and above the ephemeral one (1024 and up)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(p) for p in f.read().split())
    except (OSError, ValueError):
        low, high = 32_768, 60_999  # Linux's default
    floor = 10_000 if low > 20_000 else 1024  # clear of well-known services where there is room
    return max(range(floor, low), range(high + 1, 65_536), key=len)
