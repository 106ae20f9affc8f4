"""The GPU monitor: NVML sampling and XID events in threads of their own.

NVML calls block (a wedged GPU can hold one for seconds), so none of them runs
on the daemon's event loop. One thread samples every GPU into a bounded
`GpuSeries`; another waits for XID events with a timeout, so that `stop()`
returns promptly. Events go to `on_event`, which is called from those threads:
the daemon should hand them to its loop with `loop.call_soon_threadsafe`.

A fatal XID (policy "stop") or "GPU is lost" from any NVML call marks the GPU
unhealthy until `mark_healthy` (after a reset); the daemon places no run on it.
Without the library, the driver or a GPU, `start()` reports "GPU monitor off:
<reason>" and the monitor does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ftsup.supervisor.health import nvml as nvml_access
from ftsup.supervisor.health.gpu_metrics import GpuLost, Sample, read_info, read_sample
from ftsup.supervisor.health.nvml import Nvml, NvmlUnavailable, describe_error
from ftsup.supervisor.health.xid import XidAction, XidPolicy, describe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuEvent:
    kind: Literal["xid", "gpu_lost"]
    index: int | None
    uuid: str | None
    action: XidAction
    message: str
    at: float
    xid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MonitorStatus:
    active: bool
    message: str  # "GPU monitor on: ..." or "GPU monitor off: <reason>"
    xid_events: bool = False
    driver: str | None = None
    reason: str | None = None  # why the monitor is off (None while on)


class GpuSeries:
    """The recent samples of one GPU (a bounded ring; the oldest drop off)."""

    def __init__(self, index: int, maxlen: int) -> None:
        self.index = index
        self._samples: deque[Sample] = deque(maxlen=maxlen)

    def append(self, sample: Sample) -> None:
        self._samples.append(sample)

    def latest(self) -> Sample | None:
        return self._samples[-1] if self._samples else None

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def __len__(self) -> int:
        return len(self._samples)


class GpuMonitor:
    def __init__(
        self,
        *,
        nvml: Nvml | None = None,
        interval: float = 2.0,
        history: int = 900,
        xid_policy: XidPolicy | None = None,
        on_event: Callable[[GpuEvent], None] | None = None,
        event_wait: float = 2.0,
        clock: Callable[[], float] = time.time,
        keep_events: int = 100,
    ) -> None:
        self._module = nvml
        self._nvml: Nvml | None = None
        self.interval = interval
        self.history = history
        self.policy = xid_policy or XidPolicy()
        self._on_event = on_event
        self._event_wait_ms = max(1, int(event_wait * 1000))
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._handles: dict[int, object] = {}
        self._info: dict[int, Sample] = {}
        self._series: dict[int, GpuSeries] = {}
        self._unhealthy: dict[int, str] = {}
        self._events: deque[GpuEvent] = deque(maxlen=keep_events)
        self._event_set: object | None = None
        self.status = MonitorStatus(False, "GPU monitor off: not started")

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> MonitorStatus:
        """Open NVML, find the GPUs, start the threads. Never raises; blocks briefly."""
        if self._threads:
            return self.status
        try:
            nvml = nvml_access.load_nvml(self._module)
            nvml_access.init(nvml)
        except NvmlUnavailable as err:
            return self._off(str(err))
        except Exception as err:  # a broken install must not take the daemon down
            return self._off(f"NVML unusable: {err}")
        self._nvml = nvml
        try:
            self._open_devices(nvml)
        except NvmlUnavailable as err:
            nvml_access.shutdown(nvml)
            self._nvml = None
            return self._off(str(err))
        xid_note = self._register_xid_events(nvml)
        driver = _driver_version(nvml)
        self._stop.clear()
        self._spawn("ftsup-gpu-sampler", self._sample_loop)
        if self._event_set is not None:
            self._spawn("ftsup-gpu-xid", self._xid_loop)
        count = len(self._handles)
        message = f"GPU monitor on: {count} GPU{'s' if count != 1 else ''}"
        message += f", driver {driver}" if driver else ""
        message += f"; {xid_note}"
        self.status = MonitorStatus(True, message, self._event_set is not None, driver)
        return self.status

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads (within about `event_wait`) and close NVML."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        nvml = self._nvml
        if nvml is None:
            return
        if self._event_set is not None:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlEventSetFree(self._event_set)
            self._event_set = None
        nvml_access.shutdown(nvml)
        self._nvml = None
        if self.status.active:
            self.status = MonitorStatus(False, "GPU monitor off: stopped", reason="stopped")

    # --- queries (any thread) ---------------------------------------------------------------

    def indices(self) -> list[int]:
        with self._lock:
            return sorted(self._handles)

    def series(self, index: int) -> list[Sample]:
        with self._lock:
            series = self._series.get(index)
            return series.samples() if series else []

    def is_healthy(self, index: int) -> bool:
        with self._lock:
            return index not in self._unhealthy

    def unhealthy(self) -> dict[int, str]:
        with self._lock:
            return dict(self._unhealthy)

    def mark_healthy(self, index: int) -> None:
        """After the GPU was reset (`nvidia-smi -r`): runs may be placed on it again."""
        with self._lock:
            self._unhealthy.pop(index, None)

    def events(self) -> list[GpuEvent]:
        with self._lock:
            return list(self._events)

    def snapshot(self) -> dict[str, Any]:
        """The monitor's raw state, JSON-safe (`reading()` is what clients get)."""
        with self._lock:
            gpus = []
            for index in sorted(self._handles):
                series = self._series[index]
                gpus.append(
                    {
                        **self._info.get(index, {"index": index}),
                        "healthy": index not in self._unhealthy,
                        "unhealthy_reason": self._unhealthy.get(index),
                        "latest": series.latest(),
                        "samples": len(series),
                    }
                )
            events = [event.to_dict() for event in self._events]
        status = asdict(self.status)
        return {"status": status, "gpus": gpus, "events": events}

    def reading(self, *, simulated: bool = False) -> dict[str, Any]:
        """The daemon's `gpus` answer, in the shape `ftsup gpus --json` prints
        (`gpu_reading`). GPUs without an NVML handle are listed as unhealthy."""
        with self._lock:
            indices = sorted(set(self._handles) | set(self._unhealthy))
            gpus = [
                gpu_entry(
                    self._info.get(index, {"index": index}),
                    self._series[index].samples() if index in self._series else [],
                    self._unhealthy.get(index),
                )
                for index in indices
            ]
            events = [event.to_dict() for event in self._events]
        status = self.status
        return gpu_reading(
            available=status.active,
            status=status.message,
            reason=status.reason,
            driver=status.driver,
            gpus=gpus,
            events=events,
            simulated=simulated,
        )

    # --- work (monitor threads) -------------------------------------------------------------

    def sample_once(self) -> None:
        """Read every GPU once (the sampler thread calls this every `interval`)."""
        nvml = self._nvml
        if nvml is None:
            return
        for index, handle in list(self._handles.items()):
            try:
                sample = read_sample(nvml, handle, self._clock())
            except GpuLost as err:
                self._gpu_lost(index, str(err))
                continue
            except Exception as err:  # keep sampling the other GPUs
                log.warning("GPU %d: sampling failed: %s", index, err)
                continue
            with self._lock:
                self._series[index].append(sample)

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval)

    def _xid_loop(self) -> None:
        nvml = self._nvml
        assert nvml is not None
        timeout = nvml.NVML_ERROR_TIMEOUT
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait_v2(self._event_set, self._event_wait_ms)
            except nvml.NVMLError as err:
                if nvml_access.error_code(err) == timeout:
                    continue
                if nvml_access.is_gpu_lost(nvml, err):
                    self.sample_once()  # find out which GPU answers "lost"
                else:
                    log.warning("waiting for XID events failed: %s", describe_error(err))
                self._stop.wait(self._event_wait_ms / 1000)
                continue
            if int(data.eventType) & int(nvml.nvmlEventTypeXidCriticalError):
                self._xid(self._index_of(nvml, data.device), int(data.eventData))

    def _xid(self, index: int | None, xid: int) -> None:
        action = self.policy.action(xid)
        where = f"GPU {index}" if index is not None else "a GPU"
        message = f"{describe(xid)} on {where}"
        if action == "stop" and index is not None:
            with self._lock:
                self._unhealthy.setdefault(index, describe(xid))
        self._emit(GpuEvent("xid", index, self._uuid(index), action, message, self._clock(), xid))

    def _gpu_lost(self, index: int, detail: str) -> None:
        with self._lock:
            if index in self._unhealthy:
                return  # reported once, until mark_healthy
            self._unhealthy[index] = "GPU is lost"
        message = f"GPU {index} is lost ({detail}): it needs a reset"
        self._emit(GpuEvent("gpu_lost", index, self._uuid(index), "stop", message, self._clock()))

    def _emit(self, event: GpuEvent) -> None:
        with self._lock:
            self._events.append(event)
        log.warning("%s (action: %s)", event.message, event.action)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("GPU event callback failed")

    # --- setup ----------------------------------------------------------------------------

    def _open_devices(self, nvml: Nvml) -> None:
        count = nvml_access.device_count(nvml)
        if count == 0:
            raise NvmlUnavailable("no NVIDIA GPU found")
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as err:
                reason = describe_error(err)
                log.warning("GPU %d: no handle: %s", index, reason)
                lost = nvml_access.is_gpu_lost(nvml, err)
                self._unhealthy[index] = "GPU is lost" if lost else f"no NVML handle: {reason}"
                continue
            self._handles[index] = handle
            self._series[index] = GpuSeries(index, self.history)
            try:
                self._info[index] = read_info(nvml, handle, index)
            except GpuLost:
                self._info[index] = {"index": index}
                self._unhealthy[index] = "GPU is lost"

    def _register_xid_events(self, nvml: Nvml) -> str:
        """Returns a note for the status line: which GPUs report XIDs."""
        try:
            event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as err:
            return f"XID events off ({describe_error(err)})"
        registered, refused = [], []
        for index, handle in self._handles.items():
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
                registered.append(index)
            except nvml.NVMLError as err:
                refused.append(f"GPU {index}: {describe_error(err)}")
        if not registered:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlEventSetFree(event_set)
            return "XID events off (" + "; ".join(refused) + ")"
        self._event_set = event_set
        note = "XID events on"
        return note + (" (not on " + "; ".join(refused) + ")" if refused else "")

    def _index_of(self, nvml: Nvml, device: object) -> int | None:
        try:
            return int(nvml.nvmlDeviceGetIndex(device))
        except nvml.NVMLError:
            return None

    def _uuid(self, index: int | None) -> str | None:
        if index is None:
            return None
        with self._lock:
            uuid = self._info.get(index, {}).get("uuid")
        return uuid if isinstance(uuid, str) else None

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _off(self, reason: str) -> MonitorStatus:
        self.status = MonitorStatus(False, f"GPU monitor off: {reason}", reason=reason)
        log.info(self.status.message)
        return self.status


SERIES_POINTS = 60  # per-GPU points in a reading's "series" (the TUI's sparklines)


def gpu_entry(
    info: Mapping[str, Any], samples: Sequence[Sample], unhealthy_reason: str | None
) -> dict[str, Any]:
    """One GPU in a reading (docs/health.md): what does not change (`info`), its
    health, the newest sample whole (`latest`) and flat, and short series.
    The CLI (one sample) and the daemon (its monitor's ring) both build it here."""
    latest = samples[-1] if samples else None
    now = latest or {}
    shown = samples[-SERIES_POINTS:]
    return {
        **info,
        "healthy": unhealthy_reason is None,
        "unhealthy_reason": unhealthy_reason,
        "util": now.get("util_gpu"),
        "mem_used": now.get("mem_used"),
        "mem_total": now.get("mem_total"),
        "temp": now.get("temp_c"),
        "power": now.get("power_w"),
        "latest": latest,
        "samples": len(samples),
        "series": {
            "util": [s.get("util_gpu") for s in shown],
            "mem": [s.get("mem_used") for s in shown],
        },
    }


def gpu_reading(
    *,
    available: bool,
    status: str,
    reason: str | None,
    driver: str | None,
    gpus: Iterable[dict[str, Any]],
    events: Iterable[dict[str, Any]] = (),
    simulated: bool = False,
) -> dict[str, Any]:
    """The one shape of a GPU reading: `ftsup gpus --json` and the daemon's `gpus`
    request. `reason`: why there is no reading (None when `available`);
    `simulated`: the GPUs are FTSUP_SIMULATE_GPUS's, not real ones."""
    return {
        "available": available,
        "status": status,
        "reason": reason,
        "driver": driver,
        "gpus": list(gpus),
        "events": list(events),
        "simulated": simulated,
    }


def _driver_version(nvml: Nvml) -> str | None:
    try:
        version = nvml.nvmlSystemGetDriverVersion()
    except nvml.NVMLError:
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def unhealthy_devices(monitor: GpuMonitor, devices: Sequence[int]) -> dict[int, str]:
    """The job's GPUs that the monitor has marked unhealthy."""
    bad = monitor.unhealthy()
    return {index: bad[index] for index in devices if index in bad}
