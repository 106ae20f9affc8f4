"""Talking to the daemon: a blocking client for the CLI, an asyncio one for the TUI.

`ensure_daemon` starts a per-user daemon in the background when none answers,
the way `ftsup start` promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftsup.supervisor.paths import Layout
from ftsup.supervisor.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    RequestError,
    encode_frame,
    hello,
    read_frame,
    recv_frame_blocking,
)


class DaemonUnavailable(Exception):
    """No daemon answers on the socket."""


def _check_hello(reply: dict[str, Any] | None) -> dict[str, Any]:
    if reply is None:
        raise DaemonUnavailable("the daemon closed the connection during the handshake")
    if reply.get("type") == "error":
        error = reply.get("error", {})
        raise RequestError(error.get("code", "error"), error.get("message", "refused"))
    if reply.get("type") != "hello" or reply.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(f"unexpected handshake reply: {reply!r}")
    return reply


def _unwrap(reply: dict[str, Any] | None) -> dict[str, Any]:
    if reply is None:
        raise DaemonUnavailable("the daemon closed the connection")
    if reply.get("type") == "error" or not reply.get("ok"):
        error = reply.get("error", {})
        raise RequestError(
            error.get("code", "error"), error.get("message", "request failed"), error.get("data")
        )
    result = reply.get("result", {})
    return result if isinstance(result, dict) else {}


class Client:
    """Blocking client: one connection, one request at a time."""

    def __init__(
        self, socket_path: Path, *, timeout: float = 30.0, name: str = "ftsup-cli"
    ) -> None:
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(socket_path))
        except OSError as exc:
            self._sock.close()
            raise DaemonUnavailable(
                f"no daemon answers on {socket_path} ({exc.strerror})"
            ) from None
        self._ids = itertools.count(1)
        # A refused peer: the daemon spoke first and closed; its reason is read below.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._sock.sendall(encode_frame(hello(name)))
        try:
            self.daemon = _check_hello(recv_frame_blocking(self._sock))
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: str, **args: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        self._sock.sendall(encode_frame({"id": request_id, "type": kind, **args}))
        while True:
            reply = recv_frame_blocking(self._sock)
            if reply is not None and reply.get("type") == "event":
                continue  # an event that raced the reply of a subscribe
            return _unwrap(reply)

    def events(
        self, *, jobs: list[str] | None = None, kinds: list[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Subscribe, then yield events until the daemon goes away."""
        self.request("subscribe", jobs=jobs, kinds=kinds)
        self._sock.settimeout(None)
        while True:
            message = recv_frame_blocking(self._sock)
            if message is None:
                return
            if message.get("type") == "event":
                yield message["event"]


class AsyncClient:
    """asyncio client (the TUI): requests and a subscription on separate connections."""

    def __init__(self, socket_path: Path, *, name: str = "ftsup-tui") -> None:
        self.socket_path = socket_path
        self.name = name
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.daemon: dict[str, Any] = {}

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path))
        except OSError as exc:
            raise DaemonUnavailable(f"no daemon answers on {self.socket_path}: {exc}") from None
        self._writer.write(encode_frame(hello(self.name)))
        await self._writer.drain()
        self.daemon = _check_hello(await read_frame(self._reader))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()

    async def request(self, kind: str, **args: Any) -> dict[str, Any]:
        if self._reader is None or self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        async with self._lock:
            self._writer.write(encode_frame({"id": next(self._ids), "type": kind, **args}))
            await self._writer.drain()
            while True:
                reply = await read_frame(self._reader)
                if reply is None or reply.get("type") != "event":
                    return _unwrap(reply)

    async def subscribe(
        self, *, jobs: list[str] | None = None, kinds: list[str] | None = None
    ) -> None:
        await self.request("subscribe", jobs=jobs, kinds=kinds)

    async def next_event(self) -> dict[str, Any] | None:
        """The next pushed event (after `subscribe`), or None when the daemon is gone."""
        assert self._reader is not None
        while True:
            message = await read_frame(self._reader)
            if message is None:
                return None
            if message.get("type") == "event":
                event = message.get("event")
                return event if isinstance(event, dict) else None


def daemon_command(layout: Layout) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ftsup.supervisor",
        "daemon",
        "--state-dir",
        str(layout.state_dir),
        "--runtime-dir",
        str(layout.runtime_dir),
    ]


def ensure_daemon(layout: Layout, *, timeout: float = 20.0) -> tuple[Client, int | None]:
    """A connected client; starts a background daemon first when none answers.

    Returns the client and the pid of the daemon started here (None if one was running).
    """
    try:
        return Client(layout.socket), None
    except DaemonUnavailable:
        pass
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    with layout.daemon_log.open("ab") as log:
        process = subprocess.Popen(
            daemon_command(layout),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DaemonUnavailable(
                f"the daemon exited at once (code {process.returncode}); see {layout.daemon_log}"
            )
        try:
            return Client(layout.socket), process.pid
        except DaemonUnavailable:
            time.sleep(0.1)
    raise DaemonUnavailable(
        f"the daemon did not answer within {timeout:.0f}s; see {layout.daemon_log}"
    )
