"""The daemon's outward-facing services: systemd notify/watchdog, notifications, metrics.

Each is optional and none may slow supervision: sd_notify datagrams never block,
notifications are delivered in the background, metrics scrapes read an
immutable snapshot that the loop refreshes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.manager import JobManager
from ftsup.supervisor.policy import failure_restarts
from ftsup.supervisor.service.metrics import (
    JobMetrics,
    MetricsServer,
    MetricsUnavailable,
    Snapshot,
    start_metrics_server,
    with_goodput,
)
from ftsup.supervisor.service.notify import (
    Notification,
    NotificationDispatcher,
    senders_for,
    wanted,
)
from ftsup.supervisor.service.sdnotify import Heartbeat, Notifier, watchdog_interval, watchdog_loop
from ftsup.supervisor.spec_types import NotifySection

log = logging.getLogger("ftsup.daemon")
STATUS_INTERVAL = 5.0


@dataclass(frozen=True)
class MetricsOptions:
    port: int | None = None  # None: no endpoint (the default)
    address: str = "127.0.0.1"


class DaemonServices:
    def __init__(
        self,
        manager: JobManager,
        bus: EventBus,
        metrics: MetricsOptions,
        default_notify: NotifySection | None = None,
    ) -> None:
        self.manager = manager
        self.default_notify = default_notify  # daemon.toml's [notify]
        self.bus = bus
        self.notifier = Notifier.from_env()
        self.heartbeat = Heartbeat()
        self.dispatcher = NotificationDispatcher(record=self._record_delivery)
        self._metrics_options = metrics
        self._metrics: MetricsServer | None = None
        self._snapshot = Snapshot()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_status = ""

    # lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Called once the socket is bound and every run is re-adopted."""
        self.bus.add_listener(self._on_event)
        if self._metrics_options.port is not None:
            self._start_metrics(self._metrics_options)
        # systemd (status, watchdog) and metrics need the tick; without them (a
        # user's daemon) it has no timer of its own and sleeps while nothing happens.
        if self.notifier.enabled or self._metrics is not None:
            self._tasks.append(asyncio.create_task(self._tick_forever(), name="services"))
        interval = watchdog_interval()
        if interval is not None and self.notifier.enabled:
            liveness = self.heartbeat.fresh_within(max(interval * 2, 5.0))
            self._tasks.append(
                asyncio.create_task(
                    watchdog_loop(self.notifier, interval, liveness), name="watchdog"
                )
            )
        self.notifier.ready(status=self.summary())

    async def close(self) -> None:
        self.notifier.stopping("stopping; runs keep running")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatcher.aclose(drain_timeout=2.0)
        if self._metrics is not None:
            self._metrics.close()
        self.notifier.close()

    def _start_metrics(self, options: MetricsOptions) -> None:
        assert options.port is not None
        try:
            self._metrics = start_metrics_server(
                lambda: self._snapshot, address=options.address, port=options.port
            )
        except (MetricsUnavailable, OSError) as exc:
            log.error("metrics endpoint off: %s", exc)
            return
        log.info("metrics on %s", self._metrics.url)

    async def _tick_forever(self) -> None:
        while True:
            self.heartbeat.beat()
            if self._metrics is not None:  # only scrapes read it
                self._snapshot = self._build_snapshot()
            if self.notifier.enabled:
                status = self.summary()
                if status != self._last_status:
                    self.notifier.status(status)
                    self._last_status = status
            await asyncio.sleep(min(STATUS_INTERVAL, 1.0))

    # views ----------------------------------------------------------------
    def summary(self) -> str:
        counts = self.manager.summary()
        running = counts.get("running", 0)
        troubled = counts.get("backoff", 0) + counts.get("gave_up", 0) + counts.get("failed", 0)
        return f"{running} running, {troubled} failing or failed, {len(self.manager.runners)} jobs"

    def _build_snapshot(self) -> Snapshot:
        jobs = []
        now = time.time()
        for job in self.manager.store.jobs():
            runner = self.manager.runners.get(job.name)
            progress = runner.progress if runner else None
            since = None
            if progress is not None and progress.last_checkpoint_time is not None:
                since = max(0.0, now - progress.last_checkpoint_time)
            restarts = failure_restarts(runner.history()) if runner else 0
            metrics = JobMetrics(
                name=job.name,
                state=job.state,
                step=progress.step if progress else None,
                max_steps=progress.max_steps if progress else None,
                loss=progress.loss if progress else None,
                restarts=restarts,
                seconds_since_checkpoint=since,
            )
            if runner is not None and self._metrics is not None:  # only scrapes need these
                metrics = with_goodput(metrics, runner.goodput_report(), runner.standbys.to_json())
            jobs.append(metrics)
        return Snapshot(jobs=tuple(jobs))

    # notifications --------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        job = event.get("job")
        if job is None:
            self._on_daemon_event(event)
            return
        runner = self.manager.runners.get(str(job))
        if runner is None:
            return
        section = runner.spec.notify
        if section.webhook is None and section.command is None and self.default_notify:
            section = self.default_notify  # the job names no receiver: the daemon's default
        kind = str(event["kind"])  # `[notify] on` names events by their EventKind value
        if not wanted(section, kind):
            return
        senders = senders_for(section)
        if senders:
            self.dispatcher.submit(
                Notification(kind, str(job), event.get("message", ""), event.get("data") or {}),
                senders,
            )

    def _on_daemon_event(self, event: dict[str, Any]) -> None:
        """A daemon-wide event (`degraded`, `state_rebuilt`) goes to the daemon's
        default receiver and to every supervised job's receiver that asked for it."""
        kind = event["kind"]
        sections = [self.default_notify] if self.default_notify else []
        sections += [r.spec.notify for r in self.manager.runners.values()]
        seen: set[tuple[Any, ...]] = set()
        for section in sections:
            key = (section.webhook, tuple(section.command or ()))
            if key in seen or not wanted(section, kind):
                continue
            seen.add(key)
            if senders := senders_for(section):
                message = event.get("message", "")
                self.dispatcher.submit(
                    Notification(kind, "(daemon)", message, event.get("data") or {}), senders
                )

    def _record_delivery(self, kind: str, message: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # recording must never break a delivery
            self.bus.emit(data.get("job"), kind, message, data)
