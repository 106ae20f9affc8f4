"""The socket protocol between the daemon and its clients (CLI, TUI).

Frames are a 4-byte big-endian length followed by that many bytes of UTF-8
JSON (one object). A frame over `MAX_FRAME` closes the connection: a broken or
hostile peer must never make the daemon buffer without bound.

Conversation:
    client -> {"type": "hello", "version": 1, "client": "ftsup-cli"}
    daemon -> {"type": "hello", "version": 1, "daemon_pid": 123, ...}
    client -> {"id": 1, "type": "<request type>", ...arguments}
    daemon -> {"id": 1, "ok": true, "result": {...}}
            | {"id": 1, "ok": false, "error": {"code": "not_found", "message": "..."}}
After a `subscribe` request the daemon also pushes
    {"type": "event", "event": {"kind": ..., "job": ..., "ts": ..., ...}}
frames on that connection until it closes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME = 8 * 1024 * 1024
_HEADER = struct.Struct(">I")

# One request type per command; the daemon has one handler for each.
REQUEST_TYPES = frozenset(
    {
        "ping",
        "start",
        "status",
        "list",
        "stop",
        "restart",
        "signal",
        "checkpoint",
        "logs",
        "events",
        "checkpoints",
        "progress_history",
        "gpus",
        "gpu_reset",
        "subscribe",
        "shutdown",
    }
)


class ProtocolError(Exception):
    """The peer broke the framing or the handshake; the connection is closed."""


class RequestError(Exception):
    """A request the daemon refused; `code` is stable for scripts."""

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data or {}


def encode_frame(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message, separators=(",", ":"), default=str).encode()
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME} byte cap")
    return _HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("connection closed inside a frame header") from None
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME} byte cap")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame") from None
    return decode_payload(payload)


def recv_frame_blocking(sock: socket.socket) -> dict[str, Any] | None:
    """Blocking twin of `read_frame` for the synchronous CLI client."""
    header = _recv_exactly(sock, _HEADER.size, allow_eof=True)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME} byte cap")
    payload = _recv_exactly(sock, length, allow_eof=False)
    assert payload is not None
    return decode_payload(payload)


def _recv_exactly(sock: socket.socket, count: int, *, allow_eof: bool) -> bytes | None:
    chunks: list[bytes] = []
    remaining = count
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            if allow_eof and remaining == count:
                return None
            raise ProtocolError("connection closed inside a frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def hello(client: str) -> dict[str, Any]:
    return {"type": "hello", "version": PROTOCOL_VERSION, "client": client}
