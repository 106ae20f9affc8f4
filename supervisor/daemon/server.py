"""The daemon's Unix socket: peer check, handshake, framed requests, event push.

A connection that breaks the protocol (bad JSON, an oversized frame, no
handshake) is closed; nothing a client sends can take the daemon down or
affect other connections. Clients cannot exhaust it either: at most
`MAX_CONNECTIONS` are served at once (one more gets a `busy` error frame and
is closed, so the descriptors the runs need stay free), and the bytes held for
unfinished frames of all connections together are capped (`FRAME_BUDGET`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import ENV_RUNTIME_DIR
from ftsup.supervisor.daemon.bus import EventBus, Subscription
from ftsup.supervisor.private_dirs import ensure_private_dir
from ftsup.supervisor.protocol import (
    CONNECTION_REQUESTS,
    PROTOCOL_VERSION,
    REQUEST_ALIASES,
    REQUEST_TYPES,
    Busy,
    ByteBudget,
    EventKind,
    ProtocolError,
    RequestError,
    RequestType,
    encode_frame,
    read_frame,
)

log = logging.getLogger("ftsup.daemon")
HANDSHAKE_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0
MAX_CONNECTIONS = 256
FRAME_BUDGET = 64 * 1024 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class HandlerTableError(Exception):
    """The handler table and `RequestType` disagree: a programming error, caught at
    import and at the server's construction rather than by a user's command."""


def check_handler_table(names: Iterable[str]) -> None:
    """Every `RequestType` but those the connection serves itself has exactly one
    handler, and no handler answers a type that is not in the protocol."""
    given = {str(name) for name in names}
    expected = {str(kind) for kind in REQUEST_TYPES - CONNECTION_REQUESTS}
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        raise HandlerTableError(
            f"handler table does not match protocol.RequestType: "
            f"no handler for {missing or 'none'}; not a request type: {extra or 'none'}"
        )


def peer_uid(sock: socket.socket) -> int:
    """The connecting process's uid, from the kernel (SO_PEERCRED), not from the client."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def peer_allowed(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a connection for good. A peer that never reads what is still buffered
    for it is cut off after CLOSE_TIMEOUT (else a shutdown would wait for it
    forever), and a shutdown that cancels this wait is no error to log."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except (Exception, asyncio.CancelledError):
        writer.transport.abort()


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._write_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._write_lock:
            self.writer.write(encode_frame(message))
            await self.writer.drain()


class SocketServer:
    def __init__(
        self,
        path: Path,
        handlers: dict[str, Handler],
        bus: EventBus,
        hello_info: Callable[[], dict[str, Any]],
        *,
        max_connections: int = MAX_CONNECTIONS,
        frame_budget: int = FRAME_BUDGET,
    ) -> None:
        check_handler_table(handlers)
        self.path = path
        self.handlers = handlers
        self.bus = bus
        self.hello_info = hello_info
        self.max_connections = max_connections
        self.budget = ByteBudget(frame_budget)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._refused_busy = 0

    async def start(self) -> None:
        # Half the descriptors at most: the rest are for runs (shims, logs, checkpoint checks).
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            self.max_connections = max(8, min(self.max_connections, soft // 2))
        # Ours and private, or refuse (NotPrivate): never chmod someone else's folder.
        ensure_private_dir(self.path.parent, env_var=ENV_RUNTIME_DIR)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # stale: the caller already checked no daemon answers
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._on_connect, path=str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            await self._refuse_busy(writer)
            return
        self._connections.add(task)
        conn = Connection(reader, writer)
        subscription: Subscription | None = None
        pusher: asyncio.Task[None] | None = None
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            if not peer_allowed(uid):
                log.warning("refused a connection from uid %d", uid)
                await conn.send(
                    {
                        "type": "error",
                        "error": {
                            "code": "forbidden",
                            "message": f"uid {uid} may not use this daemon",
                        },
                    }
                )
                return
            await self._handshake(conn)
            while True:
                message = await read_frame(reader, self.budget)
                if message is None:
                    return
                if message.get("type") == RequestType.SUBSCRIBE:
                    problem = _subscription_problem(message)
                    if problem is not None:
                        await conn.send(
                            {
                                "id": message.get("id"),
                                "ok": False,
                                "error": {"code": "bad_request", "message": problem},
                            }
                        )
                        continue
                    if subscription is None:
                        subscription = self._subscribe(message)
                        pusher = asyncio.create_task(self._push(conn, subscription))
                    await conn.send({"id": message.get("id"), "ok": True, "result": {}})
                    continue
                await conn.send(await self._dispatch(message))
        except ProtocolError as exc:
            code = "busy" if isinstance(exc, Busy) else "protocol"
            log.info("closing a connection (%s): %s", code, exc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    conn.send({"type": "error", "error": {"code": code, "message": str(exc)}}),
                    HANDSHAKE_TIMEOUT,
                )
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the daemon is closing this connection on shutdown
        finally:
            if pusher is not None:
                pusher.cancel()
            if subscription is not None:
                self.bus.unsubscribe(subscription)
            await _close_writer(writer)
            self._connections.discard(task)

    async def _refuse_busy(self, writer: asyncio.StreamWriter) -> None:
        """Over the connection cap: say so and close, without reading anything."""
        self._refused_busy += 1
        if self._refused_busy == 1 or self._refused_busy % 1000 == 0:
            log.warning(
                "refused %d connection(s): %d clients already connected (the cap)",
                self._refused_busy,
                self.max_connections,
            )
        message = f"the daemon already serves {self.max_connections} connections; try again"
        with contextlib.suppress(Exception):
            writer.write(
                encode_frame({"type": "error", "error": {"code": "busy", "message": message}})
            )
        await _close_writer(writer)

    async def _handshake(self, conn: Connection) -> None:
        try:
            message = await asyncio.wait_for(
                read_frame(conn.reader, self.budget), HANDSHAKE_TIMEOUT
            )
        except TimeoutError:
            raise ProtocolError("no handshake") from None
        if message is None or message.get("type") != "hello":
            raise ProtocolError("the first frame must be a hello")
        version = message.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1 in Python
            raise ProtocolError(
                f"protocol version {version!r} not supported (daemon speaks {PROTOCOL_VERSION})"
            )
        await conn.send({"type": "hello", "version": PROTOCOL_VERSION, **self.hello_info()})

    def _subscribe(self, message: dict[str, Any]) -> Subscription:
        jobs, kinds = message.get("jobs"), message.get("kinds")
        return self.bus.subscribe(
            frozenset(map(str, jobs)) if isinstance(jobs, list) else None,
            frozenset(map(str, kinds)) if isinstance(kinds, list) else None,
        )

    async def _push(self, conn: Connection, subscription: Subscription) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while True:
                event = await subscription.queue.get()
                if subscription.lagged:
                    await conn.send(
                        {
                            "type": "event",
                            "event": {
                                "kind": EventKind.LAGGED.value,
                                "job": None,
                                "data": {"dropped": subscription.lagged},
                            },
                        }
                    )
                    subscription.lagged = 0
                await conn.send({"type": "event", "event": event})

    async def _dispatch(self, message: dict[str, Any]) -> dict[str, Any]:
        request_id = message.get("id")
        kind = message.get("type")
        if isinstance(kind, str):
            kind = REQUEST_ALIASES.get(kind, kind)
        handler = self.handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return {
                "id": request_id,
                "ok": False,
                "error": {"code": "unknown_request", "message": f"unknown request type {kind!r}"},
            }
        try:
            result = await handler(message)
        except RequestError as exc:
            return {
                "id": request_id,
                "ok": False,
                "error": {"code": exc.code, "message": exc.message, "data": exc.data},
            }
        except Exception as exc:
            log.exception("request %s failed", kind)
            return {
                "id": request_id,
                "ok": False,
                "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"},
            }
        return {"id": request_id, "ok": True, "result": result}


def _subscription_problem(message: dict[str, Any]) -> str | None:
    """`jobs` and `kinds` are absent/null (everything) or lists of strings."""
    for key in ("jobs", "kinds"):
        value = message.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"subscribe: {key!r} must be a list of strings or null, got {value!r:.80}"
    return None
