"""Events: recorded in the store (the durable history) and pushed to subscribers.

Progress and log lines are only streamed, never stored: they are high-volume
and their durable copies are `progress.jsonl` and the attempt's `stdout.log`.
A subscriber that cannot keep up loses events (and is told so) rather than
slowing the daemon down. An event the store cannot record is still published:
subscribers (the TUI, notifications) hear about a sick state disk too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ftsup.supervisor.protocol import STREAM_ONLY_KINDS, EventKind
from ftsup.supervisor.store import Store

log = logging.getLogger("ftsup.daemon")

STREAM_ONLY = STREAM_ONLY_KINDS
QUEUE_SIZE = 2000


@dataclass
class Subscription:
    jobs: frozenset[str] | None  # None: every job
    kinds: frozenset[str] | None  # None: every kind
    queue: asyncio.Queue[dict[str, Any]] = field(
        default_factory=lambda: asyncio.Queue(maxsize=QUEUE_SIZE)
    )
    lagged: int = 0

    def wants(self, event: dict[str, Any]) -> bool:
        job = event.get("job")
        if self.jobs is not None and job is not None and job not in self.jobs:
            return False
        return self.kinds is None or event["kind"] in self.kinds


class EventBus:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._subscriptions: list[Subscription] = []
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        store.add_state_listener(self._on_store_state)
        if store.degraded is not None:  # it could not even open its file
            self._on_store_state(store.degraded)

    def _on_store_state(self, degraded: str | None) -> None:
        """`degraded` when state writes start failing, `recovered` once they reach disk."""
        if degraded is not None:
            message = f"the state database cannot be written ({degraded}); kept in memory"
            self.emit(None, EventKind.DEGRADED, message + ", retrying", {"reason": degraded})
        else:
            self.emit(None, EventKind.RECOVERED, "the state database is written to disk again")

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Called on the loop for every event (notifications); must not block."""
        self._listeners.append(listener)

    def emit(
        self, job: str | None, kind: str, message: str = "", data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        now = time.time()
        event: dict[str, Any] = {
            "id": None,
            "ts": now,
            "job": job,
            "kind": kind,
            "message": message,
            "data": data or {},
        }
        if kind not in STREAM_ONLY:
            try:
                event = self._store.add_event(job, kind, message, data, ts=now)
            except Exception:  # unrecorded, the event is still worth publishing
                log.exception("cannot record event %s %r", kind, message)
        self._publish(event)
        return event

    def has_subscribers(self, kind: str) -> bool:
        return any(s.kinds is None or kind in s.kinds for s in self._subscriptions)

    def subscribe(self, jobs: frozenset[str] | None, kinds: frozenset[str] | None) -> Subscription:
        subscription = Subscription(jobs, kinds)
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def _publish(self, event: dict[str, Any]) -> None:
        for listener in self._listeners:
            listener(event)
        for subscription in self._subscriptions:
            if not subscription.wants(event):
                continue
            try:
                subscription.queue.put_nowait(event)
            except asyncio.QueueFull:
                subscription.lagged += 1
