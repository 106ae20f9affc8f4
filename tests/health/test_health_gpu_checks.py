"""Pre-launch GPU checks against the NVML double."""

from __future__ import annotations

import time

import pynvml

from ftsup.supervisor.health.gpu import GpuMonitor
from ftsup.supervisor.health.gpu_checks import (
    bf16_problems,
    check_devices,
    supports_bf16,
    wait_for_memory_release,
)
from tests.health.nvml_double import FakeGpu, FakeNvml, GiB


def test_devices_exist_and_answer() -> None:
    fake = FakeNvml([FakeGpu(), FakeGpu(lost=True)])
    assert check_devices([0], nvml=fake.module) == []
    assert check_devices([0, 1, 4], nvml=fake.module) == [
        "GPU 1 does not answer: GPU is lost",
        "GPU 4 does not exist (this machine has 2)",
    ]
    assert fake.initialized == 0
    assert check_devices([], nvml=fake.module) == []


def test_unhealthy_gpus_are_refused() -> None:
    fake = FakeNvml([FakeGpu(), FakeGpu()], xids=[(1, 79)])
    monitor = GpuMonitor(nvml=fake.module, interval=3600, event_wait=0.05)
    try:
        monitor.start()
        deadline = time.monotonic() + 5
        while monitor.is_healthy(1) and time.monotonic() < deadline:
            time.sleep(0.01)  # the XID thread marks it
        assert check_devices([0, 1], nvml=fake.module, monitor=monitor) == [
            "GPU 1 is marked unhealthy (XID 79: GPU has fallen off the bus); reset it first"
        ]
    finally:
        monitor.stop()


def test_no_nvml_is_a_problem_only_for_a_job_that_wants_gpus() -> None:
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    assert check_devices([0], nvml=fake.module) == [
        "cannot check GPUs [0]: NVIDIA driver not loaded"
    ]
    assert check_devices([], nvml=fake.module) == []


def test_wait_for_memory_release() -> None:
    gpu = FakeGpu(processes={4242: 30 * GiB, 777: GiB})
    fake = FakeNvml([gpu])
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds
        if now[0] >= 3:
            gpu.processes.pop(4242, None)  # the killed rank's memory is freed

    assert (
        wait_for_memory_release(
            [0], [4242], 10, nvml=fake.module, clock=lambda: now[0], sleep=sleep
        )
        == []
    )
    assert now[0] == 3.0
    gpu.processes[4243] = 20 * GiB
    still = wait_for_memory_release(
        [0], [4243], 2, nvml=fake.module, clock=lambda: now[0], sleep=sleep
    )
    assert still == ["GPU 0: pid 4243 still holds 20.0 GiB after 2 s"]
    assert fake.initialized == 0


def test_wait_without_nvml_or_pids_returns_at_once() -> None:
    fake = FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert wait_for_memory_release([0], [1], 60, nvml=fake.module) == []
    assert wait_for_memory_release([0], [], 60, nvml=FakeNvml([FakeGpu()]).module) == []


def test_bf16() -> None:
    fake = FakeNvml(
        [
            FakeGpu(),
            FakeGpu(name="Tesla V100-SXM2-32GB", compute_capability=(7, 0)),
            FakeGpu(name="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0)),
        ]
    )
    assert [supports_bf16(i, nvml=fake.module) for i in range(4)] == [True, False, True, None]
    assert bf16_problems([0, 1, 2], nvml=fake.module) == [
        "GPU 1 has no bf16 (compute capability below 8.0); use fp16 or another GPU"
    ]
    no_driver = FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    assert supports_bf16(0, nvml=no_driver.module) is None
