"""Events: recorded in the store (the durable history) and pushed to subscribers.

Progress and log lines are only streamed, never stored: they are high-volume
and their durable copies are `progress.jsonl` and the attempt's `stdout.log`.
A subscriber that cannot keep up loses events (and is told so) rather than
slowing the daemon down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ftsup.supervisor.store import Store

STREAM_ONLY = frozenset({"progress", "log", "gpu", "state"})
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

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Called on the loop for every event (notifications); must not block."""
        self._listeners.append(listener)

    def emit(
        self, job: str | None, kind: str, message: str = "", data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if kind in STREAM_ONLY:
            event = {
                "id": None,
                "ts": time.time(),
                "job": job,
                "kind": kind,
                "message": message,
                "data": data or {},
            }
        else:
            event = self._store.add_event(job, kind, message, data)
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
