"""A stand-in for the `pynvml` module that answers as the real library does.

It returns the real `pynvml` structures (`c_nvmlMemory_t`, `c_nvmlUtilization_t`,
`c_nvmlEventData_t`, process info through `nvmlStructToFriendlyObject`), raises the
real `pynvml.NVMLError_*` classes built from the real return codes (as pynvml's
`_nvmlCheckReturn` does), hands out real `c_nvmlDevice_t` handles, and replays a
scripted sequence of XID events through `nvmlEventSetWait_v2`, which blocks up
to its timeout and then raises NVMLError_Timeout like the real call.

It is injected into the code under test as a module (`GpuMonitor(nvml=fake.module)`);
functions it does not define are absent, so a call the double does not model
fails loudly instead of passing by accident.
"""

from __future__ import annotations

import ctypes
import threading
import types
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import pynvml

GiB = 2**30


def nvml_error(code: int) -> pynvml.NVMLError:
    """What pynvml raises for a return code: NVMLError(code) maps to its subclass."""
    return pynvml.NVMLError(code)


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-5d2b1a8e-0c44-9f3e-7b21-4a6c0e9d1f02"
    compute_capability: tuple[int, int] = (9, 0)
    memory_total: int = 80 * GiB
    memory_used: int = 61 * GiB
    util_gpu: int = 97
    util_mem: int = 58
    temp_c: int = 67
    power_mw: int = 612_345
    power_limit_mw: int = 700_000
    sm_clock_mhz: int = 1755
    clock_events: int = pynvml.nvmlClocksEventReasonSwPowerCap
    ecc: dict[tuple[int, int], int] = field(default_factory=dict)  # (error type, counter) -> n
    retired_sbe: list[int] = field(default_factory=list)
    retired_dbe: list[int] = field(default_factory=list)
    retired_pending: int = pynvml.NVML_FEATURE_DISABLED
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # corr, unc, pending, failure
    pcie_replay: int = 0
    processes: dict[int, int] = field(default_factory=dict)  # pid -> bytes
    not_supported: set[str] = field(default_factory=set)  # NVML function names
    missing: set[str] = field(default_factory=set)  # functions an older driver lacks
    errors: dict[str, int] = field(default_factory=dict)  # function name -> NVML_ERROR_*
    events_supported: bool = True
    lost: bool = False


class FakeNvml:
    """The state behind the module; `module` is what the code under test gets."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        init_error: int | None = None,
        driver: str = "550.54.15",
        xids: list[tuple[int, int]] | None = None,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.driver = driver
        self.calls: Counter[str] = Counter()
        self.initialized = 0
        self._cond = threading.Condition()
        self._events: deque[tuple[int, int]] = deque(xids or [])
        self._registered: set[int] = set()
        self._structs = [pynvml.struct_c_nvmlDevice_t() for _ in gpus]
        self.module = self._build_module()

    # --- scripting -------------------------------------------------------------------------

    def push_xid(self, index: int, xid: int) -> None:
        with self._cond:
            self._events.append((index, xid))
            self._cond.notify_all()

    def handle(self, index: int) -> Any:
        return ctypes.pointer(self._structs[index])

    # --- the module ---------------------------------------------------------------------------

    def _build_module(self) -> types.ModuleType:
        module = types.ModuleType("pynvml")
        for name in dir(pynvml):
            value = getattr(pynvml, name)
            constant = isinstance(value, int | str) and not name.startswith("_")
            if constant or isinstance(value, type):  # constants, NVMLError_*, c_nvml* structs
                setattr(module, name, value)
        module.nvmlStructToFriendlyObject = pynvml.nvmlStructToFriendlyObject
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(module, name, self._counted(name, getattr(self, name)))
        return module

    def _counted(self, name: str, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            self.calls[name] += 1
            return fn(*args)

        return call

    def _gpu(self, handle: Any, function: str) -> FakeGpu:
        return self.gpus[self._index(handle, function)]

    def _index(self, handle: Any, function: str) -> int:
        if self.initialized <= 0:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
        address = ctypes.addressof(handle.contents)
        for index, (struct, gpu) in enumerate(zip(self._structs, self.gpus, strict=True)):
            if ctypes.addressof(struct) == address:
                if gpu.lost:
                    raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
                if function in gpu.not_supported:
                    raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
                if function in gpu.missing:  # as pynvml's _nvmlGetFunctionPointer reports it
                    raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
                if function in gpu.errors:
                    raise nvml_error(gpu.errors[function])
                return index
        raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    # --- NVML functions (names and return shapes as in pynvml) ---------------------------------

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise nvml_error(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        if self.initialized <= 0:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        if self.initialized <= 0:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if not 0 <= index < len(self.gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        handle = self.handle(index)
        self._gpu(handle, "nvmlDeviceGetHandleByIndex")
        return handle

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self._index(handle, "nvmlDeviceGetIndex")

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        return self._gpu(handle, "nvmlDeviceGetCudaComputeCapability").compute_capability

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        free = gpu.memory_total - gpu.memory_used
        return pynvml.c_nvmlMemory_t(gpu.memory_total, free, gpu.memory_used)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return pynvml.c_nvmlUtilization_t(gpu.util_gpu, gpu.util_mem)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(handle, "nvmlDeviceGetTemperature").temp_c

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int) -> int:
        assert clock == pynvml.NVML_CLOCK_SM
        return self._gpu(handle, "nvmlDeviceGetClockInfo").sm_clock_mhz

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons").clock_events

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksThrottleReasons").clock_events

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTotalEccErrors")
        return gpu.ecc.get((error_type, counter), 0)

    def nvmlDeviceGetRetiredPages(self, handle: Any, cause: int) -> list[int]:
        gpu = self._gpu(handle, "nvmlDeviceGetRetiredPages")
        sbe = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
        return list(gpu.retired_sbe if cause == sbe else gpu.retired_dbe)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetRetiredPagesPendingStatus").retired_pending

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        return self._gpu(handle, "nvmlDeviceGetRemappedRows").remapped_rows

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        return self._gpu(handle, "nvmlDeviceGetPcieReplayCounter").pcie_replay

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        infos = [
            pynvml.c_nvmlProcessInfo_t(pid=p, usedGpuMemory=b) for p, b in gpu.processes.items()
        ]
        return [pynvml.nvmlStructToFriendlyObject(info) for info in infos]

    def nvmlEventSetCreate(self) -> Any:
        return ctypes.pointer(pynvml.struct_c_nvmlEventSet_t())

    def nvmlEventSetFree(self, event_set: Any) -> None:
        self._registered.clear()

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None:
        index = self._index(handle, "nvmlDeviceRegisterEvents")
        if not self.gpus[index].events_supported:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        assert event_types & pynvml.nvmlEventTypeXidCriticalError
        self._registered.add(index)

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any:
        with self._cond:
            ready = self._cond.wait_for(
                lambda: any(i in self._registered for i, _ in self._events), timeout_ms / 1000
            )
            if not ready:
                raise nvml_error(pynvml.NVML_ERROR_TIMEOUT)
            index, xid = next(e for e in self._events if e[0] in self._registered)
            self._events.remove((index, xid))
        data = pynvml.c_nvmlEventData_t()
        data.device = self.handle(index)
        data.eventType = pynvml.nvmlEventTypeXidCriticalError
        data.eventData = xid
        data.gpuInstanceId = data.computeInstanceId = 0xFFFFFFFF
        return data
