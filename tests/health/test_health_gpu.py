"""The GPU monitor against the NVML double (real pynvml structures, errors, XID events)."""

from __future__ import annotations

import json
import threading
import time

import pynvml
import pytest

from ftsup.supervisor.health.gpu import GpuEvent, GpuMonitor
from ftsup.supervisor.health.xid import XidPolicy
from tests.health.conftest import Events
from tests.health.nvml_double import FakeGpu, FakeNvml, GiB

ECC_KEYS = {
    "ecc_volatile_corrected",
    "ecc_volatile_uncorrected",
    "ecc_aggregate_corrected",
    "ecc_aggregate_uncorrected",
}
REMAP_KEYS = {
    "remapped_rows_corrected",
    "remapped_rows_uncorrected",
    "remap_pending",
    "remap_failure",
}


def test_start_reports_the_gpus(monitor: GpuMonitor, two_gpus: FakeNvml) -> None:
    status = monitor.start()
    assert status.active and status.xid_events
    assert status.message == "GPU monitor on: 2 GPUs, driver 550.54.15; XID events on"
    assert two_gpus.calls["nvmlDeviceRegisterEvents"] == 2


def test_sampling_fills_a_bounded_series(monitor: GpuMonitor) -> None:
    monitor.start()
    for _ in range(12):
        monitor.sample_once()
    assert len(monitor.series(0)) == 5  # history=5: the oldest dropped off
    times = [sample["t"] for sample in monitor.series(0)]
    assert times == sorted(times)
    sample = monitor.series(0)[-1]
    assert {k: v for k, v in sample.items() if k != "t"} == {
        "util_gpu": 97,
        "util_mem": 58,
        "mem_used": 61 * GiB,
        "mem_total": 80 * GiB,
        "temp_c": 67,
        "power_w": 612.3,
        "power_limit_w": 700.0,
        "sm_clock_mhz": 1755,
        "clock_events": ["sw_power_cap"],
        **dict.fromkeys(ECC_KEYS, 0),
        "retired_pages_sbe": 0,
        "retired_pages_dbe": 0,
        "retired_pages_pending": False,
        "remapped_rows_corrected": 0,
        "remapped_rows_uncorrected": 0,
        "remap_pending": False,
        "remap_failure": False,
        "pcie_replay": 0,
    }


def test_snapshot_is_json_safe(monitor: GpuMonitor) -> None:
    monitor.start()
    monitor.sample_once()
    snapshot = json.loads(json.dumps(monitor.snapshot()))
    assert snapshot["status"]["active"] is True
    first = snapshot["gpus"][0]
    assert (first["index"], first["name"], first["compute_capability"]) == (
        0,
        "NVIDIA H100 80GB HBM3",
        "9.0",
    )
    assert first["healthy"] is True and first["latest"]["mem_total"] == 80 * GiB
    assert snapshot["gpus"][1]["latest"]["mem_used"] == 2 * GiB


def test_the_sampler_thread_samples(two_gpus: FakeNvml) -> None:
    mon = GpuMonitor(nvml=two_gpus.module, interval=0.01, history=3, event_wait=0.05)
    try:
        mon.start()
        deadline = time.monotonic() + 5
        while len(mon.series(1)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(mon.series(1)) == 3
    finally:
        mon.stop()


def test_unsupported_metrics_are_omitted(events: Events) -> None:
    gpu = FakeGpu(
        name="NVIDIA GeForce RTX 4090",
        not_supported={
            "nvmlDeviceGetTotalEccErrors",
            "nvmlDeviceGetRetiredPages",
            "nvmlDeviceGetRetiredPagesPendingStatus",
            "nvmlDeviceGetRemappedRows",
        },
        missing={"nvmlDeviceGetPcieReplayCounter"},
        errors={"nvmlDeviceGetEnforcedPowerLimit": pynvml.NVML_ERROR_NO_PERMISSION},
    )
    fake = FakeNvml([gpu])
    mon = GpuMonitor(nvml=fake.module, interval=3600, on_event=events, event_wait=0.05)
    try:
        mon.start()
        mon.sample_once()
        sample = mon.series(0)[-1]
    finally:
        mon.stop()
    absent = ECC_KEYS | REMAP_KEYS | {"retired_pages_sbe", "retired_pages_pending", "pcie_replay"}
    assert not absent & sample.keys()
    assert {"util_gpu", "mem_used", "temp_c", "power_w", "sm_clock_mhz"} <= sample.keys()
    # Not "not supported" but a real failure: said, not hidden.
    assert sample["errors"] == {"power_limit_w": "Insufficient Permissions"}
    assert events.queue.empty()


def test_clock_events_on_a_driver_without_the_new_name() -> None:
    gpu = FakeGpu(
        missing={"nvmlDeviceGetCurrentClocksEventReasons"},
        clock_events=pynvml.nvmlClocksThrottleReasonHwSlowdown
        | pynvml.nvmlClocksThrottleReasonSwThermalSlowdown,
    )
    fake = FakeNvml([gpu])
    mon = GpuMonitor(nvml=fake.module, interval=3600, event_wait=0.05)
    try:
        mon.start()
        mon.sample_once()
        assert mon.series(0)[-1]["clock_events"] == ["hw_slowdown", "sw_thermal_slowdown"]
    finally:
        mon.stop()


def test_fatal_xid_stops_and_marks_the_gpu(
    monitor: GpuMonitor, two_gpus: FakeNvml, events: Events
) -> None:
    monitor.start()
    two_gpus.push_xid(1, 79)
    event = events.next()
    assert (event.kind, event.index, event.xid, event.action) == ("xid", 1, 79, "stop")
    assert event.message == "XID 79: GPU has fallen off the bus on GPU 1"
    assert event.uuid == "GPU-0f9e8d7c-6b5a-4938-2716-05f4e3d2c1b0"
    assert events.threads == {"ftsup-gpu-xid"}  # never the caller's (event loop's) thread
    assert not monitor.is_healthy(1) and monitor.is_healthy(0)
    assert monitor.unhealthy() == {1: "XID 79: GPU has fallen off the bus"}
    snapshot = monitor.snapshot()
    assert snapshot["gpus"][1]["healthy"] is False
    assert snapshot["events"][-1]["xid"] == 79
    monitor.mark_healthy(1)
    assert monitor.is_healthy(1)


def test_application_xid_restarts(monitor: GpuMonitor, two_gpus: FakeNvml, events: Events) -> None:
    monitor.start()
    for xid in (13, 31, 43, 45, 94):
        two_gpus.push_xid(0, xid)
        event = events.next()
        assert (event.xid, event.action) == (xid, "restart")
    two_gpus.push_xid(0, 92)  # high single-bit ECC rate: a warning
    assert events.next().action == "warn"
    two_gpus.push_xid(0, 95)
    assert events.next().action == "stop"
    assert monitor.unhealthy() == {0: "XID 95: Uncontained ECC error"}


def test_the_jobs_xid_policy_overrides(two_gpus: FakeNvml, events: Events) -> None:
    policy = XidPolicy.from_mapping({"13": "stop", "79": "warn"})
    mon = GpuMonitor(
        nvml=two_gpus.module, interval=3600, xid_policy=policy, on_event=events, event_wait=0.05
    )
    try:
        mon.start()
        two_gpus.push_xid(0, 79)
        assert events.next().action == "warn"
        assert mon.is_healthy(0)
        two_gpus.push_xid(0, 13)
        assert events.next().action == "stop"
        assert not mon.is_healthy(0)
    finally:
        mon.stop()


def test_a_scripted_sequence_is_replayed_in_order(events: Events) -> None:
    fake = FakeNvml([FakeGpu(), FakeGpu()], xids=[(0, 13), (1, 48), (0, 63)])
    mon = GpuMonitor(nvml=fake.module, interval=3600, on_event=events, event_wait=0.1)
    try:
        mon.start()
        seen = [(e.index, e.xid, e.action) for e in (events.next() for _ in range(3))]
    finally:
        mon.stop()
    assert seen == [(0, 13, "restart"), (1, 48, "stop"), (0, 63, "warn")]
    assert mon.unhealthy() == {1: "XID 48: Double Bit ECC Error"}


def test_gpu_is_lost_marks_it_unhealthy_once(
    monitor: GpuMonitor, two_gpus: FakeNvml, events: Events
) -> None:
    monitor.start()
    two_gpus.gpus[0].lost = True
    monitor.sample_once()
    monitor.sample_once()
    event = events.next()
    assert (event.kind, event.index, event.action) == ("gpu_lost", 0, "stop")
    assert event.message == "GPU 0 is lost (GPU is lost): it needs a reset"
    assert events.queue.empty()  # once, not every sample
    assert monitor.unhealthy() == {0: "GPU is lost"}
    assert len(monitor.series(1)) >= 2  # the other GPU is still sampled


def test_no_event_support_leaves_sampling_on(events: Events) -> None:
    fake = FakeNvml([FakeGpu(events_supported=False)])
    mon = GpuMonitor(nvml=fake.module, interval=3600, on_event=events, event_wait=0.05)
    try:
        status = mon.start()
        assert status.active and not status.xid_events
        assert status.message.endswith("; XID events off (GPU 0: Not Supported)")
        mon.sample_once()
        assert len(mon.series(0)) >= 1
    finally:
        mon.stop()
    assert fake.calls["nvmlEventSetFree"] == 1


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (
            pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
            "NVML library not found (is the NVIDIA driver installed?)",
        ),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVIDIA driver not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no permission to use NVML"),
    ],
)
def test_no_nvml_turns_the_monitor_off(code: int, reason: str) -> None:
    fake = FakeNvml([FakeGpu()], init_error=code)
    mon = GpuMonitor(nvml=fake.module)
    status = mon.start()
    assert (status.active, status.message) == (False, f"GPU monitor off: {reason}")
    assert mon.snapshot()["gpus"] == []
    mon.sample_once()
    mon.stop()
    assert fake.calls["nvmlDeviceGetCount"] == 0


def test_no_gpu_turns_the_monitor_off() -> None:
    fake = FakeNvml([])
    mon = GpuMonitor(nvml=fake.module)
    assert mon.start().message == "GPU monitor off: no NVIDIA GPU found"
    assert fake.initialized == 0  # NVML was closed again
    mon.stop()


def test_the_real_library_here() -> None:
    """This machine may have no driver: then the monitor is off, with the reason."""
    mon = GpuMonitor(interval=3600)
    status = mon.start()
    try:
        if not status.active:
            assert status.message.startswith("GPU monitor off: ")
        else:
            assert mon.indices()
    finally:
        mon.stop()


def test_threads_stop_promptly(two_gpus: FakeNvml) -> None:
    mon = GpuMonitor(nvml=two_gpus.module, interval=0.05, event_wait=0.2)
    mon.start()
    threads = [t for t in threading.enumerate() if t.name.startswith("ftsup-gpu")]
    assert {t.name for t in threads} == {"ftsup-gpu-sampler", "ftsup-gpu-xid"}
    began = time.monotonic()
    mon.stop()
    assert time.monotonic() - began < 1.0
    assert not any(t.is_alive() for t in threads)
    assert two_gpus.initialized == 0
    assert two_gpus.calls["nvmlEventSetFree"] == 1
    assert mon.status.message == "GPU monitor off: stopped"


def test_a_failing_callback_does_not_stop_the_monitor(two_gpus: FakeNvml) -> None:
    seen: list[int | None] = []

    def callback(event: GpuEvent) -> None:
        seen.append(event.xid)
        raise RuntimeError("the daemon's handler has a bug")

    mon = GpuMonitor(nvml=two_gpus.module, interval=3600, on_event=callback, event_wait=0.05)
    try:
        mon.start()
        two_gpus.push_xid(0, 13)
        two_gpus.push_xid(0, 31)
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [13, 31]
    finally:
        mon.stop()
