"""Simulated GPUs (`FTSUP_SIMULATE_GPUS=N` or `N:MEM_GIB`): a stand-in for `pynvml`.

For trying ftsup on a machine without GPUs and for tests of GPU handling with a
real daemon. A `SimulatedGpus` object is handed to the monitor where the
`pynvml` module would be, so everything above it (sampling, XID events, health,
the `gpus` answer) runs the same code as on real GPUs. It answers as the real
library does: real `pynvml` structures and handles, `pynvml.NVMLError` built
from NVML's return codes, `nvmlEventSetWait_v2` that blocks up to its timeout
and then raises the timeout error. `inject_xid` is the one thing real GPUs lack.

The GPUs are healthy and idle; GPUs 2k and 2k+1 share a PCIe switch and four
in a row share a NUMA node (`nvmlDeviceGetTopologyCommonAncestor`); the
compute-process list is empty until `set_processes`.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pynvml

from ftsup.supervisor.contract import ENV_SIMULATE_GPUS

GiB = 2**30
DEFAULT_MEMORY_GIB = 80
MAX_GPUS = 64
MAX_MEMORY_GIB = 4096
NAME = "Simulated GPU"
DRIVER = "simulated"
_NO_INSTANCE = 0xFFFFFFFF  # what NVML reports as gpuInstanceId without MIG


class SimulationError(ValueError):
    """FTSUP_SIMULATE_GPUS cannot be read; str() says the value and the fix."""


def parse_simulate_gpus(value: str) -> tuple[int, int]:
    """`N` or `N:MEM_GIB` -> (count, GiB per GPU)."""
    count_text, sep, memory_text = value.strip().partition(":")
    try:
        count = int(count_text)
        memory = int(memory_text) if sep else DEFAULT_MEMORY_GIB
    except ValueError:
        raise _bad(value, "not a number") from None
    if not 1 <= count <= MAX_GPUS:
        raise _bad(value, f"the GPU count must be 1..{MAX_GPUS}")
    if not 1 <= memory <= MAX_MEMORY_GIB:
        raise _bad(value, f"the memory per GPU must be 1..{MAX_MEMORY_GIB} GiB")
    return count, memory


def _bad(value: str, problem: str) -> SimulationError:
    return SimulationError(
        f"{ENV_SIMULATE_GPUS}={value!r}: {problem}; set it to N or N:MEM_GIB "
        f"(e.g. 4, or 8:80 for eight 80 GiB GPUs), or unset it to use the real GPUs"
    )


def from_env(environ: Mapping[str, str]) -> SimulatedGpus | None:
    """The simulated GPUs the environment asks for; None when it asks for none
    (unset or empty). Raises SimulationError."""
    value = environ.get(ENV_SIMULATE_GPUS, "").strip()
    if not value:
        return None
    count, memory = parse_simulate_gpus(value)
    return SimulatedGpus(count, memory)


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # maps to the NVMLError_* subclass, as pynvml raises


@dataclass
class _Gpu:
    index: int
    memory_total: int
    processes: dict[int, int] = field(default_factory=dict)  # pid -> bytes

    @property
    def uuid(self) -> str:
        return f"GPU-51a7ed00-0000-4000-8000-{self.index:012d}"


@dataclass
class _EventSet:
    handle: Any
    registered: dict[int, int] = field(default_factory=dict)  # GPU index -> event mask
    pending: deque[tuple[int, int]] = field(default_factory=deque)  # (index, xid)


class SimulatedGpus:
    """N healthy idle GPUs behind the `pynvml` calls ftsup makes. Constants, error
    classes and structures come from `pynvml` itself; NVML functions that are not
    simulated are absent (AttributeError), so a new call cannot pass by accident."""

    def __init__(self, count: int, memory_gib: int = DEFAULT_MEMORY_GIB) -> None:
        self.memory_gib = memory_gib
        self._gpus = [_Gpu(i, memory_gib * GiB) for i in range(count)]
        self._structs = [pynvml.struct_c_nvmlDevice_t() for _ in range(count)]
        self._cond = threading.Condition()
        self._initialized = 0
        self._event_sets: dict[int, _EventSet] = {}

    def __getattr__(self, name: str) -> Any:
        """NVML's constants, NVMLError classes and structures, as `pynvml` has them."""
        value = getattr(pynvml, name, None)
        if not name.startswith("_") and (isinstance(value, int | str | type)):
            return value
        raise AttributeError(f"simulated GPUs do not answer {name}")

    @property
    def count(self) -> int:
        return len(self._gpus)

    def describe(self) -> str:
        plural = "s" if self.count != 1 else ""
        return f"{self.count} simulated GPU{plural} of {self.memory_gib} GiB"

    # --- what real GPUs lack ----------------------------------------------------------------

    def inject_xid(self, index: int, xid: int) -> int:
        """An XID on GPU `index`, delivered to every event set registered for XIDs
        there (any thread). Returns how many sets got it (0: nobody listens)."""
        self._gpu_at(index)
        delivered = 0
        with self._cond:
            for event_set in self._event_sets.values():
                if event_set.registered.get(index, 0) & pynvml.nvmlEventTypeXidCriticalError:
                    event_set.pending.append((index, xid))
                    delivered += 1
            self._cond.notify_all()
        return delivered

    def hold_memory(self, pid: int, index: int, size: int) -> None:
        """Process `pid` holds `size` bytes on GPU `index` until it exits (or 0 bytes)."""
        gpu = self._gpu_at(index)
        with self._cond:
            if size > 0:
                gpu.processes[pid] = size
            else:
                gpu.processes.pop(pid, None)

    def set_processes(self, index: int, processes: Mapping[int, int]) -> None:
        """The compute processes on GPU `index`: pid -> bytes of GPU memory they hold."""
        gpu = self._gpu_at(index)
        with self._cond:
            gpu.processes = dict(processes)

    def _gpu_at(self, index: int) -> _Gpu:
        if not 0 <= index < self.count:
            raise IndexError(
                f"GPU {index} does not exist: the simulated GPUs are 0..{self.count - 1}"
            )
        return self._gpus[index]

    # --- handles -------------------------------------------------------------------------

    def _handle(self, index: int) -> Any:
        return ctypes.pointer(self._structs[index])

    def _index(self, handle: Any) -> int:
        if self._initialized <= 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        try:
            address = ctypes.addressof(handle.contents)
        except (AttributeError, TypeError, ValueError):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT) from None
        for index, struct in enumerate(self._structs):
            if ctypes.addressof(struct) == address:
                return index
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def _gpu(self, handle: Any) -> _Gpu:
        return self._gpus[self._index(handle)]

    # --- NVML: library and devices --------------------------------------------------------

    def nvmlInit(self) -> None:
        with self._cond:
            self._initialized += 1

    def nvmlShutdown(self) -> None:
        with self._cond:
            if self._initialized <= 0:
                raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
            self._initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        if self._initialized <= 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        return DRIVER

    def nvmlDeviceGetCount(self) -> int:
        if self._initialized <= 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if self._initialized <= 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        if not 0 <= index < self.count:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._handle(index)

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self._index(handle)

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._index(handle)
        return NAME

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        self._index(handle)
        return (9, 0)

    # --- NVML: readings (idle) ------------------------------------------------------------

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        gpu = self._gpu(handle)
        with self._cond:
            used = sum(_alive(gpu.processes).values())
        total = gpu.memory_total
        if not version:
            return pynvml.c_nvmlMemory_t(total, total - used, used)
        memory = pynvml.c_nvmlMemory_v2_t()
        memory.version, memory.total, memory.reserved = version, total, 0
        memory.free, memory.used = total - used, used
        return memory

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        self._index(handle)
        return pynvml.c_nvmlUtilization_t(0, 0)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        self._index(handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 31

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        self._index(handle)
        return 68_000  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        self._index(handle)
        return 700_000

    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int) -> int:
        self._index(handle)
        return 345 if clock == pynvml.NVML_CLOCK_SM else 1593

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        self._index(handle)
        return int(pynvml.nvmlClocksEventReasonGpuIdle)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self.nvmlDeviceGetCurrentClocksEventReasons(handle)

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> int:
        self._index(handle)
        return 0

    def nvmlDeviceGetRetiredPages(self, handle: Any, cause: int) -> list[int]:
        self._index(handle)
        return []

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        self._index(handle)
        return int(pynvml.NVML_FEATURE_DISABLED)

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        self._index(handle)
        return (0, 0, 0, 0)

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        self._index(handle)
        return 0

    # --- NVML: what a scheduler needs -------------------------------------------------------

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        gpu = self._gpu(handle)
        with self._cond:
            processes = sorted(_alive(gpu.processes).items())
        found = []
        for pid, used in processes:
            info = pynvml.c_nvmlProcessInfo_v3_t(
                pid=pid,
                usedGpuMemory=used,
                gpuInstanceId=_NO_INSTANCE,
                computeInstanceId=_NO_INSTANCE,
            )
            found.append(pynvml.nvmlStructToFriendlyObject(info))
        return found

    def nvmlDeviceGetTopologyCommonAncestor(self, device1: Any, device2: Any) -> int:
        """Same GPU: internal; a pair 2k, 2k+1: one PCIe switch; four in a row: one
        NUMA node; else across the system interconnect."""
        return _topology(self._index(device1), self._index(device2))

    def nvmlDeviceGetTopologyNearestGpus(self, device: Any, level: int) -> list[Any]:
        """The other GPUs whose common ancestor with `device` is `level` or nearer."""
        index = self._index(device)
        return [
            self._handle(other)
            for other in range(self.count)
            if other != index and _topology(index, other) <= level
        ]

    # --- NVML: events -----------------------------------------------------------------------

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        self._index(handle)
        return int(pynvml.nvmlEventTypeXidCriticalError)

    def nvmlEventSetCreate(self) -> Any:
        handle = ctypes.pointer(pynvml.struct_c_nvmlEventSet_t())
        with self._cond:
            self._event_sets[ctypes.addressof(handle.contents)] = _EventSet(handle)
        return handle

    def nvmlEventSetFree(self, event_set: Any) -> None:
        with self._cond:
            self._event_sets.pop(_address(event_set), None)
            self._cond.notify_all()

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None:
        index = self._index(handle)
        with self._cond:
            found = self._event_sets.get(_address(event_set))
            if found is None:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            found.registered[index] = found.registered.get(index, 0) | int(event_types)

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any:
        """The next event, or NVMLError_Timeout after `timeout_ms`."""
        key = _address(event_set)
        with self._cond:
            if self._event_sets.get(key) is None:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

            def ready() -> bool:
                found = self._event_sets.get(key)
                return found is None or bool(found.pending)

            self._cond.wait_for(ready, max(0, timeout_ms) / 1000)
            found = self._event_sets.get(key)
            if found is None or not found.pending:
                raise _error(pynvml.NVML_ERROR_TIMEOUT)
            index, xid = found.pending.popleft()
        data = pynvml.c_nvmlEventData_t()
        data.device = self._handle(index)
        data.eventType = pynvml.nvmlEventTypeXidCriticalError
        data.eventData = xid
        data.gpuInstanceId = data.computeInstanceId = _NO_INSTANCE
        return data

    def nvmlEventSetWait(self, event_set: Any, timeout_ms: int) -> Any:
        return self.nvmlEventSetWait_v2(event_set, timeout_ms)


def _address(event_set: Any) -> int:
    try:
        return ctypes.addressof(event_set.contents)
    except (AttributeError, TypeError, ValueError):
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT) from None


def _topology(a: int, b: int) -> int:
    if a == b:
        return int(pynvml.NVML_TOPOLOGY_INTERNAL)
    if a // 2 == b // 2:
        return int(pynvml.NVML_TOPOLOGY_SINGLE)
    if a // 4 == b // 4:
        return int(pynvml.NVML_TOPOLOGY_NODE)
    return int(pynvml.NVML_TOPOLOGY_SYSTEM)


def _alive(processes: dict[int, int]) -> dict[int, int]:
    """As NVML: a process that exited no longer holds memory (its context is gone).
    Dead ones are forgotten, so a reused pid never inherits them."""
    for pid in [pid for pid in processes if not os.path.exists(f"/proc/{pid}")]:
        del processes[pid]
    return processes
