"""The daemon's view of its GPUs: the NVML monitor, fault handling, launch checks.

The monitor runs in its own threads; its events are handed to the event loop
and acted on per job: the job's `[gpu] xid_actions` decide whether an XID on
one of its GPUs restarts the run, stops it, or only warns. A GPU marked
unhealthy (a GPU lost, an uncontained memory error) gets no new run until it
is reset. No driver or no GPU: "GPU monitor off: <reason>" and nothing else
changes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import ModuleType
from typing import Any

from ftsup.supervisor.atomicio import write_json_atomic
from ftsup.supervisor.contract import ENV_SIMULATE_GPUS
from ftsup.supervisor.daemon.attempt import KILL_FILE
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.runner import JobRunner
from ftsup.supervisor.health.gpu import GpuEvent, GpuMonitor
from ftsup.supervisor.health.xid import XidPolicy
from ftsup.supervisor.protocol import RequestError
from ftsup.supervisor.spec_types import JobSpec

log = logging.getLogger("ftsup.daemon")
KILLED_BY_GPU = "ftsup-gpu-fault"


class GpuSupervision:
    def __init__(
        self, bus: EventBus, runners: dict[str, JobRunner], nvml: ModuleType | None = None
    ) -> None:
        self.bus = bus
        self.runners = runners
        self.monitor = GpuMonitor(nvml=nvml, on_event=self._from_thread)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> str:
        self._loop = asyncio.get_running_loop()
        status = await asyncio.to_thread(self.monitor.start)
        log.info("%s", status.message)
        return status.message

    async def close(self) -> None:
        await asyncio.to_thread(self.monitor.stop)

    @property
    def active(self) -> bool:
        return self.monitor.status.active

    # faults ---------------------------------------------------------------
    def _from_thread(self, event: GpuEvent) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.handle, event)

    def handle(self, event: GpuEvent) -> None:
        """Act on one GPU event for every job running on that GPU."""
        self.bus.emit(None, "gpu_fault", event.message, event.to_dict())
        for runner in list(self.runners.values()):
            if runner.attempt is None or not _uses(runner.spec, event.index):
                continue
            action = self._action_for(runner.spec, event)
            data = {**event.to_dict(), "action": action}
            self.bus.emit(runner.name, "gpu_fault", f"{event.message}: {action} the run", data)
            if action == "restart":
                write_json_atomic(
                    runner.attempt.attempt_dir / KILL_FILE,
                    {"killed_by": KILLED_BY_GPU, "reason": event.message},
                )
                runner.signal_trainer(signal.SIGKILL)
            elif action == "stop":
                runner.request_stop(now=True)

    @staticmethod
    def _action_for(spec: JobSpec, event: GpuEvent) -> str:
        if event.kind == "gpu_lost" or event.xid is None:
            return "stop"
        return str(XidPolicy.from_mapping(spec.gpu.xid_actions).action(event.xid))

    # launch checks --------------------------------------------------------
    def preflight(self, spec: JobSpec) -> tuple[str, str]:
        """("ok" | "wait" | "fail", why) before an attempt is launched."""
        devices = spec.gpu.devices
        if devices is None:
            unhealthy = self.monitor.unhealthy()
            if unhealthy and self.active and len(unhealthy) >= len(self.snapshot()["gpus"]):
                return "wait", "every GPU is marked unhealthy: " + _describe(unhealthy)
            return "ok", ""
        if not self.active:
            return "fail", (f"[gpu] devices = {list(devices)}, but {self.monitor.status.message}")
        sick = {i: why for i, why in self.monitor.unhealthy().items() if i in devices}
        if sick:
            return "wait", "waiting for unhealthy GPUs to be reset: " + _describe(sick)
        known = {gpu["index"] for gpu in self.snapshot()["gpus"]}
        missing = [d for d in devices if d not in known]
        if missing:
            return "fail", f"[gpu] devices names GPUs that do not exist: {missing}"
        return "ok", ""

    def mark_healthy(self, index: int) -> None:
        self.monitor.mark_healthy(index)
        self.bus.emit(None, "gpu_reset", f"GPU {index} marked healthy again")
        for runner in self.runners.values():
            runner.wake()  # jobs waiting for this GPU check again now

    # view -----------------------------------------------------------------
    def simulate_xid(self, index: int, xid: int) -> None:
        """Inject an XID on a simulated GPU (`ftsup gpus simulate-xid`); refused on real ones."""
        raise RequestError(
            "not_simulated",
            "simulate-xid works only on simulated GPUs "
            f"(start the daemon with {ENV_SIMULATE_GPUS}=N)",
        )

    def snapshot(self) -> dict[str, Any]:
        """The `gpus` answer: the same shape as `ftsup gpus --json` (health.gpu)."""
        return self.monitor.reading()


def _uses(spec: JobSpec, index: int | None) -> bool:
    return index is None or spec.gpu.devices is None or index in spec.gpu.devices


def _describe(unhealthy: dict[int, str]) -> str:
    return "; ".join(f"GPU {i}: {why}" for i, why in sorted(unhealthy.items()))
