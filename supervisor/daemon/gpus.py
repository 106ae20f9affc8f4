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
import os
import signal
import threading
from typing import Any

from ftsup.supervisor.atomicio import write_json_atomic
from ftsup.supervisor.contract import ENV_SIMULATE_GPUS
from ftsup.supervisor.daemon.attempt import KILL_FILE
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.runner import JobRunner
from ftsup.supervisor.health.gpu import GpuEvent, GpuMonitor
from ftsup.supervisor.health.gpu_checks import gpu_pids
from ftsup.supervisor.health.nvml import Nvml, NvmlUnavailable, describe_error, nvml_session
from ftsup.supervisor.health.simulated import SimulatedGpus
from ftsup.supervisor.health.xid import XidPolicy
from ftsup.supervisor.protocol import RequestError
from ftsup.supervisor.spec_types import JobSpec

log = logging.getLogger("ftsup.daemon")
KILLED_BY_GPU = "ftsup-gpu-fault"
SIMULATED_XID_WAIT = 2.0  # seconds simulate_xid waits for the monitor to take its XID


class GpuSupervision:
    def __init__(
        self, bus: EventBus, runners: dict[str, JobRunner], nvml: Nvml | None = None
    ) -> None:
        self.bus = bus
        self.runners = runners
        self.monitor = GpuMonitor(nvml=nvml, on_event=self._from_thread)
        self._nvml = nvml  # None: the real pynvml
        self.groups: dict[int, int] = {}  # GPU -> its switch group (topology_groups)
        # FTSUP_SIMULATE_GPUS: the monitor reads these instead of NVML (simulate-xid works)
        self.simulated = nvml if isinstance(nvml, SimulatedGpus) else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seen = threading.Condition()
        self._events_seen = 0  # monitor events so far (simulate_xid waits for its own)

    async def start(self) -> str:
        self._loop = asyncio.get_running_loop()
        status = await asyncio.to_thread(self.monitor.start)
        log.info("%s", status.message)
        if status.active:
            self.groups = await asyncio.to_thread(self.topology_groups)
        return status.message

    async def close(self) -> None:
        await asyncio.to_thread(self.monitor.stop)

    @property
    def active(self) -> bool:
        return self.monitor.status.active

    # faults ---------------------------------------------------------------
    def _from_thread(self, event: GpuEvent) -> None:
        with self._seen:
            self._events_seen += 1
            self._seen.notify_all()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.handle, event)

    def handle(self, event: GpuEvent) -> None:
        """Act on one GPU event for every job running on that GPU."""
        self.bus.emit(None, "gpu_fault", event.message, event.to_dict())
        for runner in list(self.runners.values()):
            if runner.attempt is None or not _uses(runner, event.index):
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
            action = "stop"
        else:
            action = str(XidPolicy.from_mapping(spec.gpu.xid_actions).action(event.xid))
        if action == "stop" and spec.gpu.count is not None:
            # A `count` job is not tied to this GPU: the queue places it again on
            # healthy ones, and it resumes from its newest valid checkpoint.
            return "restart"
        return action

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

    # for placement (blocking NVML calls: call them from a thread) -------------
    def topology_groups(self) -> dict[int, int]:
        """GPU index -> the lowest index of the GPUs it shares a PCIe switch with
        (NVML's common ancestor at NVML_TOPOLOGY_MULTIPLE or nearer). Empty when
        NVML cannot tell (no monitor, a driver without topology)."""
        indices = self.monitor.indices()
        groups: dict[int, int] = {}
        try:
            with nvml_session(self._nvml) as n:
                if not hasattr(n, "nvmlDeviceGetTopologyCommonAncestor"):
                    return {}  # a binding without it (an old pynvml, a double): unknown
                try:
                    handles = {i: n.nvmlDeviceGetHandleByIndex(i) for i in indices}
                    for i in indices:
                        groups.setdefault(i, i)
                        for j in indices:
                            if j > i and j not in groups:
                                level = n.nvmlDeviceGetTopologyCommonAncestor(
                                    handles[i], handles[j]
                                )
                                if int(level) <= int(n.NVML_TOPOLOGY_MULTIPLE):
                                    groups[j] = groups[i]
                except n.NVMLError as err:  # not supported, a GPU lost: no topology, no fault
                    log.info("GPU topology unknown: %s", describe_error(err))
                    return {}
        except NvmlUnavailable:
            return {}
        return groups

    def gpu_processes(self) -> dict[int, dict[int, int | None]]:
        """GPU index -> {pid: bytes of GPU memory} of its compute processes (NVML's
        list: host pids). GPUs that do not answer are left out."""
        found: dict[int, dict[int, int | None]] = {}
        try:
            with nvml_session(self._nvml) as n:
                for index in self.monitor.indices():
                    try:
                        found[index] = gpu_pids(n, index)
                    except n.NVMLError as err:
                        log.debug("GPU %d: no process list: %s", index, describe_error(err))
        except NvmlUnavailable:
            return {}
        return found

    # view -----------------------------------------------------------------
    def simulate_process(self, index: int, pid: int, size: int) -> None:
        """`ftsup gpus simulate-process`: process `pid` holds `size` bytes on simulated
        GPU `index` until it exits, as another user's process (or a dying run) would."""
        self._simulated_gpu(index, "simulate-process")
        assert self.simulated is not None
        if not os.path.exists(f"/proc/{pid}"):
            raise RequestError("bad_request", f"no process {pid} on this machine")
        self.simulated.hold_memory(pid, index, size)
        log.info("simulated process %d holds %d bytes on GPU %d", pid, size, index)

    def _simulated_gpu(self, index: int, verb: str) -> None:
        """Refuse unless the GPUs are simulated and `index` is one of them."""
        if self.simulated is None:
            raise RequestError(
                "not_simulated",
                f"{verb} works only on simulated GPUs "
                f"(start the daemon with {ENV_SIMULATE_GPUS}=N)",
            )
        count = self.simulated.count
        if not 0 <= index < count:
            raise RequestError(
                "bad_request",
                f"GPU {index} does not exist: the simulated GPUs are 0..{count - 1}",
                {"index": index, "count": count},
            )

    def simulate_xid(self, index: int, xid: int) -> None:
        """Inject an XID on a simulated GPU (`ftsup gpus simulate-xid`); refused on real ones.

        The XID takes the path of a real one (the monitor's XID thread, `handle`).
        This waits, briefly, until the monitor has taken it, so that the answer's
        snapshot shows its effect; the jobs are acted on right after, on the loop."""
        self._simulated_gpu(index, "simulate-xid")
        assert self.simulated is not None
        with self._seen:
            before = self._events_seen
        if self.simulated.inject_xid(index, xid) == 0:
            raise RequestError(
                "not_running",
                f"the GPU monitor does not listen for XIDs ({self.monitor.status.message})",
            )
        with self._seen:
            self._seen.wait_for(lambda: self._events_seen > before, SIMULATED_XID_WAIT)
        log.info("simulated XID %d on GPU %d", xid, index)

    def snapshot(self) -> dict[str, Any]:
        """The `gpus` answer: the same shape as `ftsup gpus --json` (health.gpu)."""
        return self.monitor.reading(simulated=self.simulated is not None)


def _uses(runner: JobRunner, index: int | None) -> bool:
    """Whether the job runs on GPU `index` (None: a fault not tied to one GPU)."""
    devices = runner.devices
    if index is None:
        return True
    if devices is None:  # a job that names no GPU may use any, unless it asked for a count
        return runner.spec.gpu.count is None
    return index in devices


def _describe(unhealthy: dict[int, str]) -> str:
    return "; ".join(f"GPU {i}: {why}" for i, why in sorted(unhealthy.items()))
