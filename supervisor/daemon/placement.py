"""The daemon's GPU queue: who holds which GPU, who waits, and why.

The decisions are `scheduling.plan`'s (pure, tested on its own); this module
keeps its inputs (the GPUs as the monitor sees them, the allocations, the
waiting jobs, the other jobs' outcomes) and acts on its answer: it grants GPUs
to waiting runners, shows the others as `queued` or `blocked` with the reason,
and records every allocation in the database, so that a new daemon that
re-adopts running trainers knows who holds what before it places anything.

A job keeps its GPUs across restarts (a restart never waits behind another job,
and never races another job for the memory the dying run frees); it gives them
back when its supervision ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.health.gpu import GpuMonitor
from ftsup.supervisor.procinfo import environment, is_same_process
from ftsup.supervisor.protocol import EventKind, JobState
from ftsup.supervisor.scheduling import (
    GpuView,
    Holding,
    Request,
    foreign_busy,
    free_gpus,
    plan,
)
from ftsup.supervisor.spec_types import DEFAULT_FOREIGN_MEMORY_LIMIT, JobSpec
from ftsup.supervisor.store import Store

if TYPE_CHECKING:  # both import this module
    from ftsup.supervisor.daemon.gpus import GpuSupervision
    from ftsup.supervisor.daemon.runner import JobRunner

log = logging.getLogger("ftsup.daemon")

# The GPUs as the monitor sees them now; None when there is no monitor (no NVML).
GpuViews = Callable[[], list[GpuView] | None]
# Show a waiting job's state and reason (the runner's own state setter).
ShowState = Callable[[str, str], None]
# Stop a preemptible job gracefully so that `for_job` can have its GPUs.
Preempt = Callable[[str, str], None]
# Seconds a running job still needs (its ETA), None when unknown: for backfill.
Remaining = Callable[[str], float | None]
# GPU -> MiB held by processes that are no ftsup job's (NVML; blocking: run in a thread).
ForeignMemory = Callable[[], dict[int, int]]
# An elastic job runs on fewer GPUs than it asked for; `why`: the GPUs it could have now.
Regrow = Callable[[str, str], None]
REPLAN_INTERVAL_S = 2.0  # while jobs wait: GPU health and foreign memory change on their own


def views_from_monitor(
    monitor: GpuMonitor, groups: Mapping[int, int] | None = None
) -> list[GpuView] | None:
    """The GPUs as the health monitor knows them (None when it is off: no NVML), with
    their switch groups (NVML topology) where known."""
    if not monitor.status.active:
        return None
    unhealthy, groups = monitor.unhealthy(), groups or {}
    return [
        GpuView(
            index=index,
            healthy=index not in unhealthy,
            unhealthy_reason=unhealthy.get(index),
            group=groups.get(index),
        )
        for index in monitor.indices()
    ]


def foreign_memory(gpus: GpuSupervision, runners: Mapping[str, JobRunner]) -> dict[int, int]:
    """GPU -> MiB held by compute processes that belong to no running ftsup job
    (NVML's process lists; blocking: call it in a thread)."""
    owners = [runner.attempt.owner() for runner in list(runners.values()) if runner.attempt]
    found: dict[int, int] = {}
    for index, processes in gpus.gpu_processes().items():
        held = sum(
            used or 0 for pid, used in processes.items() if not any(owns(pid) for owns in owners)
        )
        found[index] = held >> 20
    return found


def trainer_gpus(pids: Mapping[str, object]) -> tuple[int, ...] | None:
    """The GPUs a running trainer was started on: its CUDA_VISIBLE_DEVICES, read from
    /proc (the daemon set it), only while `pids` (its pids.json) still names the very
    process (start time). None when unknown or unset."""
    pid, start = pids.get("trainer_pid"), pids.get("trainer_start")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if not isinstance(start, int) or not is_same_process(pid, start):
        return None
    try:
        value = environment(pid).get("CUDA_VISIBLE_DEVICES")
    except OSError:
        return None
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        return None  # UUIDs or MIG names: not ours to interpret


def elastic_count(spec: JobSpec, healthy: int | None) -> int | None:
    """The GPUs to ask for: `count`, or for an elastic job the largest divisor of it
    that the machine's `healthy` GPUs can still meet (the trainer keeps the global
    batch by raising the accumulation by count / that)."""
    count = spec.gpu.count
    if count is None or not spec.gpu.elastic or healthy is None or healthy >= count:
        return count
    return max(d for d in range(1, count + 1) if count % d == 0 and d <= max(healthy, 1))


def wants_queue(spec: JobSpec) -> bool:
    """Jobs that ask for GPUs or run after others go through the queue."""
    return spec.gpu.count is not None or spec.gpu.devices is not None or bool(spec.job.after)


@dataclass
class _Ticket:
    spec: JobSpec
    seq: float
    show: ShowState
    granted: asyncio.Event = field(default_factory=asyncio.Event)
    gpus: tuple[int, ...] | None = None
    shown: tuple[str, str] | None = None


class Placement:
    def __init__(self, store: Store, bus: EventBus, gpu_views: GpuViews | None = None) -> None:
        self.store = store
        self.bus = bus
        self.gpu_views = gpu_views
        self.preempt: Preempt | None = None
        self.remaining: Remaining | None = None
        self.foreign_memory: ForeignMemory | None = None
        self._foreign: dict[int, int] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self.holdings: dict[str, tuple[int, ...]] = {}
        self._specs: dict[str, JobSpec] = {}
        self._tickets: dict[str, _Ticket] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._order: tuple[str, ...] = ()  # the requests in the last plan's queue order
        self.foreign_limit_mib = DEFAULT_FOREIGN_MEMORY_LIMIT >> 20  # daemon.toml [gpu]
        # Ask an elastic job that runs on fewer GPUs than it wants to restart on more.
        self.regrow: Regrow | None = None

    def restore(self, specs: Mapping[str, JobSpec], running: Mapping[str, tuple[int, ...]]) -> None:
        """At start, before any placement: the allocations of the jobs still live.
        `running`: the GPUs re-adopted trainers were started on (their environment),
        which win over the database (a database rebuilt from runs/ has none)."""
        for job, gpus in self.store.allocations().items():
            if job in specs:
                self.holdings[job] = gpus
                self._specs[job] = specs[job]
            else:
                self.store.clear_allocation(job)
        for job, gpus in running.items():
            if job in specs and wants_queue(specs[job]) and self.holdings.get(job) != gpus:
                self.holdings[job] = gpus
                self._specs[job] = specs[job]
                self.store.set_allocation(job, gpus)

    # the runner's side -------------------------------------------------------
    def held(self, job: str) -> tuple[int, ...] | None:
        return self.holdings.get(job)

    async def acquire(
        self, spec: JobSpec, show: ShowState, stopped: Callable[[], bool], wake: asyncio.Event
    ) -> tuple[int, ...] | None:
        """The GPUs `spec` may start on (`()` for a job that needs none), once the
        queue grants them; None when the job was stopped while it waited."""
        held = self.holdings.get(spec.name)
        if held is not None and spec.gpu.count is not None and self._lost(held, self._views()):
            self._drop(spec.name)  # re-placed on healthy GPUs, from its newest checkpoint
            held = None
        if held is not None or not wants_queue(spec):
            return held if held is not None else ()
        job = self.store.get_job(spec.name)
        ticket = _Ticket(spec, job.created_at if job else time.time(), show)
        await self._refresh_foreign()  # another user's process on a GPU makes it busy
        self._tickets[spec.name] = ticket
        try:
            self.replan()
            while ticket.gpus is None:
                if stopped():
                    return None
                wake.clear()
                waiters = [asyncio.ensure_future(e.wait()) for e in (ticket.granted, wake)]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
            return ticket.gpus
        finally:
            self._tickets.pop(spec.name, None)

    def release(self, job: str) -> None:
        """The job's supervision ended: its GPUs go back, its successors may start."""
        self._drop(job)
        self.replan()

    async def foreign_on(self, gpus: tuple[int, ...]) -> dict[int, int]:
        """GPU -> MiB held there by processes that are no running ftsup job's, for the
        GPUs of `gpus` at or above the limit (fresh NVML process lists, read off the loop).
        A (re)launch waits while this is not empty: a restart never races the memory
        its own dying run still holds, nor another user's process."""
        if self.foreign_memory is None or not gpus:
            return {}
        await self._refresh_foreign()
        found = {i: self._foreign.get(i, 0) for i in gpus}
        return {i: mib for i, mib in found.items() if foreign_busy(mib, self.foreign_limit_mib)}

    def _drop(self, job: str) -> None:
        if self.holdings.pop(job, None) is not None:
            self._specs.pop(job, None)
            self.store.clear_allocation(job)

    def _views(self) -> list[GpuView] | None:
        return self.gpu_views() if self.gpu_views is not None else None

    @staticmethod
    def _lost(gpus: tuple[int, ...], views: list[GpuView] | None) -> bool:
        """Some of these GPUs are unhealthy or gone (known only with a monitor)."""
        if views is None:
            return False
        healthy = {view.index for view in views if view.healthy}
        return not set(gpus) <= healthy

    def queue(self) -> dict[str, object]:
        """`ftsup queue`: who holds which GPUs, and the waiting jobs in the order the
        queue considers them (priority, then submission), each with why it waits."""
        holding = [{"job": job, "gpus": list(gpus)} for job, gpus in self.holdings.items()]
        rank = {name: i for i, name in enumerate(self._order)}
        ordered = sorted(self._tickets.values(), key=lambda t: rank.get(t.spec.name, len(rank)))
        waiting = [
            {
                "job": t.spec.name,
                "position": position,
                "priority": t.spec.job.priority,
                "count": t.spec.gpu.count,
                "devices": list(t.spec.gpu.devices) if t.spec.gpu.devices else None,
                "after": list(t.spec.job.after),
                "state": t.shown[0] if t.shown else JobState.QUEUED.value,
                "reason": t.shown[1] if t.shown else None,
            }
            for position, t in enumerate(ordered, start=1)
        ]
        foreign = {str(i): mib for i, mib in sorted(self._foreign.items()) if mib}
        return {
            "holding": holding,
            "waiting": waiting,
            "foreign_mib": foreign,  # GPU -> MiB of processes that are no job's (last look)
            "foreign_limit_mib": self.foreign_limit_mib,
        }

    def update_spec(self, spec: JobSpec) -> None:
        """The job's spec changed (`ftsup priority`): decide again with it."""
        if spec.name in self._specs:
            self._specs[spec.name] = spec
        ticket = self._tickets.get(spec.name)
        if ticket is not None:
            ticket.spec = spec
        self.replan()

    # deciding ------------------------------------------------------------------
    def replan(self) -> None:
        """Ask `scheduling.plan` and act on its answer (cheap: call it on any change).
        A failure here is logged and tried again: it must not end a job or the loop."""
        try:
            self._replan()
        except Exception:
            log.exception("GPU placement failed; trying again in %.0fs", REPLAN_INTERVAL_S)
            self._schedule_replan()

    def _replan(self) -> None:
        if not self._tickets:
            self._cancel_timer()
            self._regrow_elastic()
            return
        now = time.time()
        views = self._views()
        decided = plan(
            self._gpus(views),
            [self._holding(job, gpus, now) for job, gpus in self.holdings.items()],
            self._requests(views),
            outcomes={job.name: job.state for job in self.store.jobs()},
            now=now,
            foreign_limit_mib=self.foreign_limit_mib,
        )
        self._order = decided.order
        for name, gpus in decided.start.items():
            self._grant(name, gpus)
        for victim, for_job in decided.preempt.items():
            if self.preempt is not None:  # named again on each plan until it is gone
                self.preempt(victim, for_job)
        for name, why in decided.waiting.items():
            self._show(name, JobState.QUEUED, EventKind.QUEUED, why)
        for name, why in decided.blocked.items():
            ticket = self._tickets.get(name)
            if views is None and ticket is not None and ticket.spec.gpu.count is not None:
                why = f"{why} (the GPU monitor is off: without NVML no GPU is known)"
            self._show(name, JobState.BLOCKED, EventKind.BLOCKED, why)
        self._schedule_replan()

    def _grant(self, name: str, gpus: tuple[int, ...]) -> None:
        ticket = self._tickets.get(name)
        if ticket is None:
            return
        ticket.gpus = gpus
        ticket.granted.set()
        if gpus:
            self.holdings[name] = gpus
            self._specs[name] = ticket.spec
            self.store.set_allocation(name, gpus)
            shown = ",".join(str(index) for index in gpus)
            self.bus.emit(name, EventKind.PLACED, f"placed on GPU {shown}", {"gpus": list(gpus)})

    def _show(self, name: str, state: str, kind: str, why: str) -> None:
        ticket = self._tickets.get(name)
        if ticket is None or ticket.shown == (state, why):
            return
        ticket.shown = (state, why)
        ticket.show(state, why)
        self.bus.emit(name, kind, why)

    def _gpus(self, views: list[GpuView] | None) -> list[GpuView]:
        if views is not None:
            return [replace(v, foreign_mib=self._foreign.get(v.index, 0)) for v in views]
        # No monitor: nothing is known of the GPUs but the indices jobs name; those
        # are taken as they are (exclusive among ftsup's jobs, health unknown).
        named = {i for spec in self._all_specs() for i in (spec.gpu.devices or ())}
        named |= {i for gpus in self.holdings.values() for i in gpus}
        return [GpuView(index=index, healthy=True) for index in sorted(named)]

    def _all_specs(self) -> list[JobSpec]:
        return [*self._specs.values(), *(t.spec for t in self._tickets.values())]

    def _holding(self, job: str, gpus: tuple[int, ...], now: float) -> Holding:
        left = self.remaining(job) if self.remaining is not None else None
        end = now + left if left is not None else None  # unknown: may end at any moment
        spec = self._specs.get(job)
        if spec is None:
            return Holding(job=job, gpus=gpus, expected_end=end)
        return Holding(
            job=job,
            gpus=gpus,
            priority=spec.job.priority,
            preemptible=spec.job.preemptible,
            expected_end=end,
        )

    def _requests(self, views: list[GpuView] | None) -> list[Request]:
        ordered = sorted(self._tickets.values(), key=lambda t: (t.seq, t.spec.name))
        healthy = None if views is None else sum(1 for view in views if view.healthy)
        return [
            Request(
                job=t.spec.name,
                count=elastic_count(t.spec, healthy),
                devices=t.spec.gpu.devices,
                priority=t.spec.job.priority,
                seq=seq,
                after=t.spec.job.after,
            )
            for seq, t in enumerate(ordered)
        ]

    def _regrow_elastic(self) -> None:
        """With no job waiting: an elastic job on fewer GPUs than it asked for, that
        could now run on more (healthy, free, no foreign memory), is asked to save
        and restart on them (once; it asks again only if that did not happen)."""
        views = self._views()
        if self.regrow is None or views is None:
            return
        healthy = sum(1 for view in views if view.healthy)
        holdings = [Holding(job=job, gpus=gpus) for job, gpus in self.holdings.items()]
        free = sorted(
            free_gpus(self._gpus(views), holdings, foreign_limit_mib=self.foreign_limit_mib)
        )
        for job, gpus in list(self.holdings.items()):
            spec = self._specs.get(job)
            if spec is None or not spec.gpu.elastic:
                continue
            wanted = elastic_count(spec, healthy)
            if wanted is not None and len(gpus) < wanted <= len(gpus) + len(free):
                shown = ",".join(str(i) for i in sorted([*gpus, *free][:wanted]))
                self.regrow(job, f"{wanted} healthy GPUs are free again ({shown})")

    def _schedule_replan(self) -> None:
        if self._timer is None and self._tickets:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(REPLAN_INTERVAL_S, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.foreign_memory is None:
            self.replan()
        elif self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_then_replan())

    async def _refresh_then_replan(self) -> None:
        await self._refresh_foreign()
        self.replan()

    async def _refresh_foreign(self) -> None:
        """Foreign memory per GPU, read off the loop; a failure keeps the last reading."""
        if self.foreign_memory is None:
            return
        try:
            self._foreign = await asyncio.to_thread(self.foreign_memory)
        except Exception:
            log.exception("cannot read the GPUs' process lists; keeping the last reading")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
