"""The socket protocol between the daemon and its clients (CLI, TUI).

Frames are a 4-byte big-endian length followed by that many bytes of UTF-8
JSON (one object). A frame over `MAX_FRAME` closes the connection: a broken or
hostile peer must never make the daemon buffer without bound. The daemon reads
a frame's body in chunks and counts the bytes held for unfinished frames of
all connections together (`ByteBudget`): many peers that each announce a big
frame and send part of it get refused, instead of costing the daemon their
sum. Nesting deeper than `MAX_DEPTH` is a protocol error, not a RecursionError.

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
from enum import StrEnum
from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME = 8 * 1024 * 1024
MAX_DEPTH = 64
READ_CHUNK = 64 * 1024
FRAME_TIMEOUT = 30.0  # seconds from a frame's header to its last byte (daemon side)
_HEADER = struct.Struct(">I")


class RequestType(StrEnum):
    """Every request the daemon serves: the server checks its handler table against
    this at construction, so a request without a handler (or a handler no client can
    name) fails the daemon's start, not a user's command."""

    PING = "ping"
    START = "start"
    STATUS = "status"
    LIST = "list"
    STOP = "stop"
    RESTART = "restart"
    SIGNAL = "signal"
    SAVE = "save"  # save a checkpoint now (SIGUSR2); was "checkpoint"
    LOGS = "logs"
    EVENTS = "events"
    CHECKPOINTS = "checkpoints"
    PROGRESS_HISTORY = "progress_history"
    GPUS = "gpus"
    GPU_RESET = "gpu_reset"
    GPU_SIMULATE_XID = "gpu_simulate_xid"  # refused unless the daemon's GPUs are simulated
    GPU_SIMULATE_PROCESS = "gpu_simulate_process"  # likewise
    PRIORITY = "priority"
    QUEUE = "queue"
    SUBSCRIBE = "subscribe"  # served by the connection itself: it turns into a stream
    SHUTDOWN = "shutdown"


REQUEST_TYPES = frozenset(RequestType)
# Old request names the daemon still answers (clients of an older ftsup).
REQUEST_ALIASES: dict[str, RequestType] = {"checkpoint": RequestType.SAVE}
# Requests the socket server answers itself; every other one needs a handler.
CONNECTION_REQUESTS = frozenset({RequestType.SUBSCRIBE})


class JobState(StrEnum):
    """A job's state as stored, served and shown. The values are the wire strings."""

    PENDING = "pending"
    QUEUED = "queued"  # waits for GPUs, or for the jobs it runs after
    BLOCKED = "blocked"  # a job it runs after failed, or it asks for GPUs that do not exist
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FINISHED = "finished"
    STOPPED = "stopped"
    GAVE_UP = "gave_up"
    FAILED = "failed"


# Supervision goes on (a runner owns the job) in these; plain strings (SQL parameters).
LIVE_STATES: tuple[str, ...] = tuple(
    s.value
    for s in (
        JobState.PENDING,
        JobState.QUEUED,
        JobState.BLOCKED,
        JobState.STARTING,
        JobState.RUNNING,
        JobState.BACKOFF,
        JobState.STOPPING,
    )
)
# Supervision is over; each of these is also the kind of the event that says so.
TERMINAL_STATES: tuple[str, ...] = tuple(
    s.value for s in (JobState.FINISHED, JobState.STOPPED, JobState.GAVE_UP, JobState.FAILED)
)

# One colour per state (rich style names) for the CLI and the TUI alike. Each state
# also keeps a distinct word, so the picture still reads under NO_COLOR.
STATE_STYLES: dict[str, str] = {
    JobState.RUNNING: "bold green",
    JobState.STARTING: "green",
    JobState.PENDING: "yellow",
    JobState.QUEUED: "cyan",
    JobState.BLOCKED: "magenta",
    JobState.STOPPING: "yellow",
    JobState.BACKOFF: "bold yellow",
    JobState.GAVE_UP: "bold red",
    JobState.FAILED: "bold red",
    JobState.FINISHED: "bold blue",
    JobState.STOPPED: "dim",
}


class EventKind(StrEnum):
    """Every event kind the daemon records or streams (`ftsup events`, `subscribe`,
    `[notify] on`). docs/events.md lists each one; a test keeps the two in step."""

    # a job's life
    SUBMITTED = "submitted"
    ADOPTED = "adopted"
    LAUNCH_WAIT = "launch_wait"
    QUEUED = "queued"
    BLOCKED = "blocked"
    PLACED = "placed"
    PREEMPTED = "preempted"
    PRIORITY = "priority"  # `ftsup priority` changed a job's place in the queue
    RESIZED = "resized"  # an elastic job runs on another number of GPUs, same global batch
    WAITING_FOR_NODES = "waiting_for_nodes"  # a multi-node launcher waits in the rendezvous
    NODES_JOINED = "nodes_joined"  # ... and every node of the job is there
    ATTEMPT_STARTED = "attempt_started"
    ATTEMPT_EXITED = "attempt_exited"
    RESTART = "restart"
    FINISHED = "finished"
    STOPPED = "stopped"
    GAVE_UP = "gave_up"
    FAILED = "failed"
    DRIFT = "drift"
    SIGNAL = "signal"
    STANDBY_READY = "standby_ready"
    STANDBY_LOST = "standby_lost"
    MEMORY_RESUME = "memory_resume"  # an attempt resumes a memory snapshot, not a disk checkpoint
    # health
    HUNG = "hung"
    STACKS = "stacks"
    LOSS_ANOMALY = "loss_anomaly"
    GPU_FAULT = "gpu_fault"
    GPU_RESET = "gpu_reset"
    WARNING = "warning"
    # checkpoints and disk
    CHECKPOINT = "checkpoint"
    SAVE_REQUESTED = "save_requested"
    QUARANTINE = "quarantine"
    RETENTION = "retention"
    DISK_GUARD = "disk_guard"
    # the daemon
    DAEMON_STARTED = "daemon_started"
    DEGRADED = "degraded"
    RECOVERED = "recovered"
    STATE_REBUILT = "state_rebuilt"
    # notification outcomes
    NOTIFY_DELIVERED = "notify_delivered"
    NOTIFY_RETRY = "notify_retry"
    NOTIFY_FAILED = "notify_failed"
    NOTIFY_DROPPED = "notify_dropped"
    # streamed to subscribers only, never recorded
    PROGRESS = "progress"
    LOG = "log"
    GPU = "gpu"
    STATE = "state"
    LAGGED = "lagged"


# Pushed to subscribers but not stored: frequent, and the job row or logs hold them.
STREAM_ONLY_KINDS = frozenset(
    {EventKind.PROGRESS, EventKind.LOG, EventKind.GPU, EventKind.STATE, EventKind.LAGGED}
)

# The events a user can pick in `[notify] on = [...]` (job files and daemon.toml).
NOTIFY_EVENTS: tuple[EventKind, ...] = (
    EventKind.FINISHED,
    EventKind.FAILED,
    EventKind.GAVE_UP,
    EventKind.HUNG,
    EventKind.GPU_FAULT,
    EventKind.DISK_GUARD,
    EventKind.LOSS_ANOMALY,
    EventKind.RESTART,
    EventKind.DEGRADED,  # the state disk refuses writes (daemon-wide)
    EventKind.STATE_REBUILT,  # the database was rebuilt from runs/ at start (daemon-wide)
)
# Old names still accepted in `[notify] on`, read as the event's own name.
NOTIFY_ALIASES: dict[str, EventKind] = {"restarted": EventKind.RESTART}


class ProtocolError(Exception):
    """The peer broke the framing or the handshake; the connection is closed."""


class Busy(ProtocolError):
    """The daemon is at a cap (connections, buffered bytes): try again later."""


class ByteBudget:
    """Bytes held for partial frames across every connection, with a cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0

    def take(self, count: int) -> None:
        if self.used + count > self.cap:
            raise Busy(
                f"{self.used} bytes of unfinished frames already buffered "
                f"(cap {self.cap}); send the frame again later"
            )
        self.used += count

    def give_back(self, count: int) -> None:
        self.used = max(0, self.used - count)


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
    except RecursionError:
        raise ProtocolError(f"frame nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    _check_depth(message)
    return message


def _check_depth(message: dict[str, Any]) -> None:
    """Refuse nesting deeper than MAX_DEPTH (iteratively: the check itself must not
    recurse), so that no handler can hit a RecursionError on what it was sent."""
    stack: list[tuple[Any, int]] = [(message, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError(f"frame nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


async def read_frame(
    reader: asyncio.StreamReader,
    budget: ByteBudget | None = None,
    *,
    body_timeout: float = FRAME_TIMEOUT,
) -> dict[str, Any] | None:
    """The next message, or None at a clean end of stream.

    With a `budget` (the daemon), the body is read in chunks counted against it
    while the frame is unfinished, and must arrive within `body_timeout` once its
    header has: an announced length reserves nothing, and a peer that stops in the
    middle of a frame gives its bytes back."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("connection closed inside a frame header") from None
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME} byte cap")
    if budget is None:
        try:
            payload = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ProtocolError("connection closed inside a frame") from None
        return decode_payload(payload)
    try:
        return await asyncio.wait_for(_read_body(reader, length, budget), body_timeout)
    except TimeoutError:
        raise ProtocolError(f"frame not finished within {body_timeout:g}s") from None


async def _read_body(
    reader: asyncio.StreamReader, length: int, budget: ByteBudget
) -> dict[str, Any]:
    """Chunks counted against the budget while the frame is unfinished. A small frame
    (one chunk: every ordinary request) is exempt, so that `ftsup ls` is answered even
    while others hold the budget; its cost is bounded by the connection cap."""
    counted = length > READ_CHUNK
    chunks: list[bytes] = []
    held = 0
    try:
        while held < length:
            chunk = await reader.read(min(READ_CHUNK, length - held))
            if not chunk:
                raise ProtocolError("connection closed inside a frame")
            if counted:
                budget.take(len(chunk))
            held += len(chunk)
            chunks.append(chunk)
        payload = b"".join(chunks)
        chunks.clear()
        return decode_payload(payload)
    finally:
        # Drop the bytes now: a traceback that keeps this frame alive must not keep them.
        chunks.clear()
        if counted:
            budget.give_back(held)


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
