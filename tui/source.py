"""Where the app's data comes from: the live daemon, or a recording of it.

Both kinds post the same messages (`Connected`, `Disconnected`, `DaemonEvent`)
and answer the same requests, so every screen runs the same code whether it
talks to a daemon over a socket or replays answers a daemon once gave (which
is what keeps the snapshot tests deterministic).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from textual.message import Message


class NotConnected(Exception):
    """The daemon is not reachable right now; the request was not sent (or its answer lost)."""


Post = Callable[[Message], object]


class Source(Protocol):
    """A daemon, as the app sees it."""

    target: str

    async def run(self, post: Post) -> None:
        """Connect, stream events into `post` and reconnect forever (a worker's body)."""

    async def request(self, kind: str, **args: Any) -> dict[str, Any]:
        """One request; raises NotConnected or ftsup.supervisor.protocol.RequestError."""

    def now(self) -> float:
        """The wall time the screens measure ages against."""

    async def close(self) -> None:
        """Drop the connections (the app is exiting)."""
