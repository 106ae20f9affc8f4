"""The live link to the daemon: two AsyncClients, run inside a Textual worker.

One connection carries requests, the other the event subscription (a
subscribed connection is busy streaming, and a slow request must never hold
events back). When either breaks, both are dropped and the worker reconnects
with exponential backoff, posting `Disconnected` each time, so the screens can
say "reconnecting…" and nothing else has to care. After every (re)connect the
app receives `Connected` and reloads what it shows, because events pushed while
it was away are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftsup.supervisor.client import AsyncClient, DaemonUnavailable
from ftsup.supervisor.protocol import ProtocolError, RequestError
from ftsup.tui.messages import Connected, DaemonEvent, Disconnected
from ftsup.tui.source import NotConnected, Post

# Errors that mean "the connection is unusable", as opposed to a refused request.
LINK_ERRORS: tuple[type[BaseException], ...] = (
    DaemonUnavailable,
    ProtocolError,
    ConnectionError,
    OSError,
    EOFError,
    asyncio.IncompleteReadError,
)
REQUEST_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *LINK_ERRORS)


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Seconds to wait before try number `attempt` (1-based): doubling, capped."""
    return float(min(maximum, initial * 2 ** max(0, attempt - 1)))


class DaemonConnection:
    """The `Source` for a daemon listening on `socket_path`."""

    def __init__(
        self,
        socket_path: Path,
        *,
        request_timeout: float = 15.0,
        backoff_initial: float = 0.25,
        backoff_max: float = 2.0,
        target: str | None = None,
        before_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.before_reconnect = before_reconnect  # blocking; run in a thread (the SSH tunnel)
        self.target = target or str(socket_path)
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._requests: AsyncClient | None = None
        self._events: AsyncClient | None = None
        self._request_lock = asyncio.Lock()

    def now(self) -> float:
        return time.time()

    async def run(self, post: Post) -> None:
        failures = 0
        while True:
            reason = "the daemon closed the connection"
            try:
                await self._connect()
                assert self._requests is not None and self._events is not None
                failures = 0
                post(Connected(dict(self._requests.daemon)))
                while True:
                    event = await self._events.next_event()
                    if event is None:
                        break
                    post(DaemonEvent(event))
            except RequestError as exc:  # refused at the handshake (e.g. forbidden)
                reason = f"{exc.code}: {exc.message}"
            except LINK_ERRORS as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                await self._drop()
            failures += 1
            delay = backoff_delay(failures, self.backoff_initial, self.backoff_max)
            post(Disconnected(reason, failures, delay))
            await asyncio.sleep(delay)
            if self.before_reconnect is not None:
                await asyncio.to_thread(self.before_reconnect)

    async def _connect(self) -> None:
        requests = AsyncClient(self.socket_path, name="ftsup-tui")
        events = AsyncClient(self.socket_path, name="ftsup-tui-events")
        try:
            await asyncio.wait_for(requests.connect(), self.request_timeout)
            await asyncio.wait_for(events.connect(), self.request_timeout)
            # Subscribe before the app loads anything, so that nothing that
            # happens between its first answer and the stream is missed.
            await asyncio.wait_for(events.subscribe(), self.request_timeout)
        except BaseException:
            await _close(requests)
            await _close(events)
            raise
        self._requests, self._events = requests, events

    async def _drop(self) -> None:
        requests, events = self._requests, self._events
        self._requests = self._events = None
        if requests is not None:
            await _close(requests)
        if events is not None:
            await _close(events)

    async def request(self, kind: str, **args: Any) -> dict[str, Any]:
        client = self._requests
        if client is None:
            raise NotConnected(f"not connected to {self.target}")
        # The exchange runs as its own task: a caller that is cancelled (its
        # screen closed) must not cut a reply in half and leave the stream
        # out of step for the next request.
        exchange = asyncio.ensure_future(client.request(kind, **args))
        try:
            return await asyncio.wait_for(asyncio.shield(exchange), self.request_timeout)
        except RequestError:
            raise
        except REQUEST_ERRORS as exc:
            exchange.cancel()
            # The stream is unusable (or the daemon hangs): drop both
            # connections; the worker reconnects and the app reloads.
            if self._requests is client:
                self._requests = None
                await _close(client)
                if self._events is not None:
                    await _close(self._events)
            raise NotConnected(f"{kind}: {exc or type(exc).__name__}") from None

    async def close(self) -> None:
        await self._drop()


async def _close(client: AsyncClient) -> None:
    with contextlib.suppress(Exception):
        await client.close()
