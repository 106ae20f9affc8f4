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
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import ENV_CLIENT_TIMEOUT
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.private_dirs import NotPrivate, ensure_private_dir, open_private, trusted_uids
from ftsup.supervisor.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    RequestError,
    encode_frame,
    hello,
    read_frame,
    recv_frame_blocking,
)

DEFAULT_TIMEOUT = 30.0


class DaemonUnavailable(Exception):
    """No daemon answers on the socket."""


class DaemonUntrusted(DaemonUnavailable):
    """The socket or its folder belongs to someone else: nothing was sent to it.
    `hint` says how to fix it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class DaemonNotAnswering(DaemonUnavailable):
    """A daemon accepted the connection but did not answer in time (frozen)."""


def default_timeout() -> float:
    """Seconds to wait for any answer ($FTSUP_CLIENT_TIMEOUT, default 30): a frozen
    daemon is reported as unavailable, not waited for forever."""
    try:
        value = float(os.environ.get(ENV_CLIENT_TIMEOUT, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if 0 < value < 86400 else DEFAULT_TIMEOUT


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _trusted(socket_path: Path) -> frozenset[int] | None:
    """Who may answer on `socket_path`; None when its folder does not exist."""
    try:
        return trusted_uids(socket_path.parent)
    except NotPrivate as exc:
        raise DaemonUntrusted(f"{socket_path.parent} {exc.problem}", exc.hint) from None


def verify_peer(sock: socket.socket, socket_path: Path, trusted: frozenset[int]) -> None:
    """Before a single byte is sent: the socket file and the process listening on
    it (SO_PEERCRED, from the kernel) must both be ours, root's, or the uid root
    gave the folder to. Anyone else could be collecting job specs and secrets."""
    peer = _peer_uid(sock)
    try:
        owner = os.stat(socket_path).st_uid
    except OSError as exc:
        raise DaemonUnavailable(f"no daemon answers on {socket_path} ({exc.strerror})") from None
    for what, uid in (("the socket file", owner), ("the process serving it", peer)):
        if uid not in trusted:
            raise DaemonUntrusted(
                f"{what} {socket_path} belongs to uid {uid}, not to you (uid {os.geteuid()}); "
                "nothing was sent to it",
                "Another user may be posing as your ftsup daemon: remove the socket (as "
                "root), or point FTSUP_RUNTIME_DIR at a folder of your own.",
            )


def _check_hello(reply: dict[str, Any] | None) -> dict[str, Any]:
    if reply is None:
        raise DaemonUnavailable("the daemon closed the connection during the handshake")
    if reply.get("type") == "error":
        error = reply.get("error", {})
        raise RequestError(error.get("code", "error"), error.get("message", "refused"))
    if reply.get("type") != "hello" or reply.get("version") != PROTOCOL_VERSION:
        raise DaemonUnavailable(f"not an ftsup daemon: unexpected handshake reply {reply!r:.200}")
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
        self, socket_path: Path, *, timeout: float | None = None, name: str = "ftsup-cli"
    ) -> None:
        self.socket_path = socket_path
        self.timeout = default_timeout() if timeout is None else timeout
        trusted = _trusted(socket_path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(self.timeout)
        try:
            if trusted is None:
                raise FileNotFoundError(2, "No such file or directory")
            self._sock.connect(str(socket_path))
            verify_peer(self._sock, socket_path, trusted)
        except OSError as exc:
            self._sock.close()
            raise DaemonUnavailable(
                f"no daemon answers on {socket_path} ({exc.strerror or exc})"
            ) from None
        except BaseException:
            self._sock.close()
            raise
        self._ids = itertools.count(1)
        try:
            # A refused peer: the daemon spoke first and closed; its reason is read below.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._sock.sendall(encode_frame(hello(name)))
            self.daemon = _check_hello(self._recv())
        except BaseException:
            self._sock.close()
            raise

    def _recv(self) -> dict[str, Any] | None:
        """The next frame; a daemon that does not answer in time is unavailable."""
        try:
            return recv_frame_blocking(self._sock)
        except TimeoutError:
            raise DaemonNotAnswering(
                f"the daemon on {self.socket_path} did not answer within {self.timeout:g}s "
                f"(frozen or overloaded; ${ENV_CLIENT_TIMEOUT} sets the wait)"
            ) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise DaemonUnavailable(
                f"the daemon on {self.socket_path} dropped the connection ({exc.strerror})"
            ) from None
        except ProtocolError as exc:
            raise DaemonUnavailable(
                f"what answers on {self.socket_path} does not speak ftsup's protocol ({exc})"
            ) from None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: str, **args: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        try:
            self._sock.sendall(encode_frame({"id": request_id, "type": kind, **args}))
        except (TimeoutError, ConnectionResetError, BrokenPipeError) as exc:
            raise DaemonUnavailable(
                f"the daemon on {self.socket_path} stopped reading ({exc})"
            ) from None
        while True:
            reply = self._recv()
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
            message = self._recv()
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
        trusted = _trusted(self.socket_path)
        try:
            if trusted is None:
                raise FileNotFoundError(2, "No such file or directory")
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path))
        except OSError as exc:
            raise DaemonUnavailable(f"no daemon answers on {self.socket_path}: {exc}") from None
        try:
            verify_peer(self._writer.get_extra_info("socket"), self.socket_path, trusted)
        except BaseException:
            self._writer.close()
            raise
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
    except (DaemonUntrusted, DaemonNotAnswering):
        raise  # starting a second daemon would not help
    except DaemonUnavailable:
        pass
    try:
        ensure_private_dir(layout.state_dir)
    except NotPrivate as exc:
        raise DaemonUntrusted(f"{exc.path} {exc.problem}", exc.hint) from None
    with os.fdopen(open_private(layout.daemon_log, os.O_WRONLY | os.O_APPEND), "ab") as log:
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
        except DaemonUntrusted:
            raise
        except DaemonUnavailable:
            time.sleep(0.1)
    raise DaemonUnavailable(
        f"the daemon did not answer within {timeout:.0f}s; see {layout.daemon_log}"
    )
