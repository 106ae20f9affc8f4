"""The daemon's Unix socket: peer check, handshake, framed requests, event push.

A connection that breaks the protocol (bad JSON, an oversized frame, no
handshake) is closed; nothing a client sends can take the daemon down or
affect other connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ftsup.supervisor.daemon.bus import EventBus, Subscription
from ftsup.supervisor.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    RequestError,
    encode_frame,
    read_frame,
)

log = logging.getLogger("ftsup.daemon")
HANDSHAKE_TIMEOUT = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def peer_uid(sock: socket.socket) -> int:
    """The connecting process's uid, from the kernel (SO_PEERCRED), not from the client."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def peer_allowed(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


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
    ) -> None:
        self.path = path
        self.handlers = handlers
        self.bus = bus
        self.hello_info = hello_info
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
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
                message = await read_frame(reader)
                if message is None:
                    return
                if message.get("type") == "subscribe":
                    if subscription is None:
                        subscription = self._subscribe(message)
                        pusher = asyncio.create_task(self._push(conn, subscription))
                    await conn.send({"id": message.get("id"), "ok": True, "result": {}})
                    continue
                await conn.send(await self._dispatch(message))
        except ProtocolError as exc:
            log.info("closing a connection that broke the protocol: %s", exc)
            with contextlib.suppress(Exception):
                await conn.send(
                    {"type": "error", "error": {"code": "protocol", "message": str(exc)}}
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
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._connections.discard(task)

    async def _handshake(self, conn: Connection) -> None:
        try:
            message = await asyncio.wait_for(read_frame(conn.reader), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            raise ProtocolError("no handshake") from None
        if message is None or message.get("type") != "hello":
            raise ProtocolError("the first frame must be a hello")
        version = message.get("version")
        if version != PROTOCOL_VERSION:
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
                                "kind": "lagged",
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
