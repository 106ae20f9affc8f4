"""Fixtures for the service tests: real sockets in short temp dirs, systemd-analyze."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.requirements import require_tool


@pytest.fixture
def systemd_analyze() -> str:
    """The systemd-analyze executable; without it the test fails (it would test nothing)."""
    return require_tool("systemd-analyze", "install it with `bash .ci/install-systemd.sh`")


# For tests that run systemd-analyze through ftsup's own code rather than by path.
needs_systemd_analyze = pytest.mark.usefixtures("systemd_analyze")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: unix socket paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ftsup-t-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class DatagramReceiver:
    """A bound AF_UNIX datagram socket that records (monotonic time, text) in a thread."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        with self._lock:
            return [text for _, text in self.messages]

    def times_of(self, text: str) -> list[float]:
        with self._lock:
            return [at for at, got in self.messages if got == text]

    def wait_for(self, text: str, timeout: float = 30.0) -> float:
        """Arrival time of the first message equal to `text`."""
        return self.wait_count(text, 1, timeout)[0]

    def wait_count(self, text: str, count: int, timeout: float = 30.0) -> list[float]:
        """Arrival times of the messages equal to `text`, once at least `count` came.

        Blocking (a thread receives): call it from a loop that must stay blocked, or
        through `asyncio.to_thread`.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(found := self.times_of(text)) >= count:
                return found
            time.sleep(0.01)
        raise AssertionError(f"{count} x {text!r} never arrived; got {self.texts()!r}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def notify_socket(short_tmp: Path) -> Iterator[tuple[str, DatagramReceiver]]:
    """(NOTIFY_SOCKET value, receiver) for a real path socket."""
    path = str(short_tmp / "notify.sock")
    receiver = DatagramReceiver(path)
    try:
        yield path, receiver
    finally:
        receiver.close()


class Receiver:
    """A real HTTP server on 127.0.0.1 that records JSON bodies.

    `statuses` are answered in order (then 200); while `hold` is set by a test,
    requests wait on `release` for up to 10 s, like a receiver that hangs.
    `arrived` counts the requests read so far (held ones included); `held` records,
    per held request, whether `release` came (True) or the 10 s ran out (False).
    """

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.hold = False
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.arrived = 0
        self.held: list[bool] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                with receiver.lock:
                    receiver.arrived += 1
                if receiver.hold:
                    released = receiver.release.wait(10)
                    with receiver.lock:
                        receiver.held.append(released)
                with receiver.lock:
                    receiver.bodies.append(body)
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                with contextlib.suppress(OSError):  # the client may have timed out
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hooks/T000/SECRET"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def http_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    receiver = Receiver()
    try:
        yield receiver
    finally:
        receiver.close()
