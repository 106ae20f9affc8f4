"""One reading of one GPU through NVML, as a JSON-safe dict.

Each metric is read on its own: a GPU or driver that does not support one
(consumer cards have no ECC, older drivers no row remapper) simply omits that
key. Other per-metric errors are kept under "errors" so that `ftsup gpus`
can say why a field is missing. "GPU is lost" from any call ends the reading
with `GpuLost`: the monitor then marks the GPU unhealthy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ftsup.supervisor.health.nvml import (
    Nvml,
    describe_error,
    error_code,
    is_gpu_lost,
    is_not_supported,
)

Sample = dict[str, Any]

# NVML's clock-event ("throttle") reason bits, by the names NVML gives them.
_CLOCK_EVENTS = (
    ("nvmlClocksEventReasonGpuIdle", 0x1, "gpu_idle"),
    ("nvmlClocksEventReasonApplicationsClocksSetting", 0x2, "applications_clocks"),
    ("nvmlClocksEventReasonSwPowerCap", 0x4, "sw_power_cap"),
    ("nvmlClocksEventReasonHwSlowdown", 0x8, "hw_slowdown"),
    ("nvmlClocksEventReasonSyncBoost", 0x10, "sync_boost"),
    ("nvmlClocksEventReasonSwThermalSlowdown", 0x20, "sw_thermal_slowdown"),
    ("nvmlClocksEventReasonHwThermalSlowdown", 0x40, "hw_thermal_slowdown"),
    ("nvmlClocksEventReasonHwPowerBrakeSlowdown", 0x80, "hw_power_brake"),
    ("nvmlClocksEventReasonDisplayClockSetting", 0x100, "display_clocks"),
)


class GpuLost(Exception):
    """NVML answered "GPU is lost" (the GPU fell off the bus or needs a reset)."""


def clock_event_names(nvml: Nvml, mask: int) -> list[str]:
    return [name for attr, bit, name in _CLOCK_EVENTS if mask & int(getattr(nvml, attr, bit))]


class _Reader:
    def __init__(self, nvml: Nvml, handle: object) -> None:
        self.nvml = nvml
        self.handle = handle
        self.sample: Sample = {}
        self.errors: dict[str, str] = {}

    def read(
        self, keys: tuple[str, ...], call: Callable[[], Any], convert: Callable[[Any], Any]
    ) -> None:
        """Run one NVML call and store its converted value(s) under `keys`."""
        try:
            values = convert(call())
        except self.nvml.NVMLError as err:
            if is_gpu_lost(self.nvml, err):
                raise GpuLost(describe_error(err)) from err
            if not is_not_supported(self.nvml, err):
                self.errors[keys[0]] = describe_error(err)
            return
        if len(keys) == 1:
            values = (values,)
        self.sample.update(zip(keys, values, strict=True))


def read_sample(nvml: Nvml, handle: object, at: float) -> Sample:
    """A reading of every metric the GPU supports; raises GpuLost."""
    r = _Reader(nvml, handle)
    n = nvml
    r.read(
        ("util_gpu", "util_mem"),
        lambda: n.nvmlDeviceGetUtilizationRates(handle),
        lambda u: (int(u.gpu), int(u.memory)),
    )
    r.read(
        ("mem_used", "mem_total"),
        lambda: n.nvmlDeviceGetMemoryInfo(handle),
        lambda m: (int(m.used), int(m.total)),
    )
    r.read(("temp_c",), lambda: n.nvmlDeviceGetTemperature(handle, n.NVML_TEMPERATURE_GPU), int)
    r.read(("power_w",), lambda: n.nvmlDeviceGetPowerUsage(handle), _milliwatts)
    r.read(("power_limit_w",), lambda: n.nvmlDeviceGetEnforcedPowerLimit(handle), _milliwatts)
    r.read(("sm_clock_mhz",), lambda: n.nvmlDeviceGetClockInfo(handle, n.NVML_CLOCK_SM), int)
    r.read(("clock_events",), lambda: _clock_events(n, handle), lambda m: clock_event_names(n, m))
    for counter, counter_name in (
        (n.NVML_VOLATILE_ECC, "volatile"),
        (n.NVML_AGGREGATE_ECC, "aggregate"),
    ):
        for kind, kind_name in (
            (n.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"),
            (n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected"),
        ):
            r.read((f"ecc_{counter_name}_{kind_name}",), _ecc_call(n, handle, kind, counter), int)
    sbe = n.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
    dbe = n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    r.read(("retired_pages_sbe",), lambda: n.nvmlDeviceGetRetiredPages(handle, sbe), len)
    r.read(("retired_pages_dbe",), lambda: n.nvmlDeviceGetRetiredPages(handle, dbe), len)
    r.read(
        ("retired_pages_pending",), lambda: n.nvmlDeviceGetRetiredPagesPendingStatus(handle), bool
    )
    r.read(
        ("remapped_rows_corrected", "remapped_rows_uncorrected", "remap_pending", "remap_failure"),
        lambda: n.nvmlDeviceGetRemappedRows(handle),
        lambda v: (int(v[0]), int(v[1]), bool(v[2]), bool(v[3])),
    )
    r.read(("pcie_replay",), lambda: n.nvmlDeviceGetPcieReplayCounter(handle), int)
    sample: Sample = {"t": at, **r.sample}
    if r.errors:
        sample["errors"] = r.errors
    return sample


def read_info(nvml: Nvml, handle: object, index: int) -> Sample:
    """What does not change: name, UUID, compute capability."""
    r = _Reader(nvml, handle)
    r.read(("name",), lambda: nvml.nvmlDeviceGetName(handle), _text)
    r.read(("uuid",), lambda: nvml.nvmlDeviceGetUUID(handle), _text)
    r.read(
        ("compute_capability",),
        lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle),
        lambda cc: f"{int(cc[0])}.{int(cc[1])}",
    )
    return {"index": index, **r.sample}


def _clock_events(nvml: Nvml, handle: object) -> int:
    """The current reasons mask; drivers before r535 only have the "Throttle" name."""
    try:
        return int(nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
    except nvml.NVMLError as err:
        if _function_not_found(nvml, err):
            return int(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
        raise


def _ecc_call(nvml: Nvml, handle: object, kind: int, counter: int) -> Callable[[], Any]:
    return lambda: nvml.nvmlDeviceGetTotalEccErrors(handle, kind, counter)


def _function_not_found(nvml: Nvml, err: BaseException) -> bool:
    return error_code(err) == int(nvml.NVML_ERROR_FUNCTION_NOT_FOUND)


def _milliwatts(value: Any) -> float:
    return round(int(value) / 1000.0, 1)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
