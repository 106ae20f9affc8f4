"""Checks before a launch: the GPUs exist and are healthy, the last attempt's memory
is released, bf16 is supported. Cheaper to refuse here than to fail a run later.

Indices are NVML's, which follow PCI bus order; CUDA numbers GPUs the same way
only with CUDA_DEVICE_ORDER=PCI_BUS_ID, which the daemon sets for trainers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ftsup.supervisor.health.gpu import GpuMonitor
from ftsup.supervisor.health.nvml import (
    Nvml,
    NvmlUnavailable,
    describe_error,
    device_count,
    nvml_session,
)

BF16_MIN_CAPABILITY = (8, 0)  # Ampere


def check_devices(
    devices: Sequence[int], *, nvml: Nvml | None = None, monitor: GpuMonitor | None = None
) -> list[str]:
    """Problems with the job's GPUs (empty: good to launch)."""
    if not devices:
        return []
    problems = []
    try:
        with nvml_session(nvml) as n:
            count = device_count(n)
            for index in devices:
                if not 0 <= index < count:
                    problems.append(f"GPU {index} does not exist (this machine has {count})")
                    continue
                try:
                    handle = n.nvmlDeviceGetHandleByIndex(index)
                    n.nvmlDeviceGetMemoryInfo(handle)
                except n.NVMLError as err:
                    problems.append(f"GPU {index} does not answer: {describe_error(err)}")
    except NvmlUnavailable as err:
        return [f"cannot check GPUs {list(devices)}: {err}"]
    if monitor is not None:
        for index, reason in sorted(monitor.unhealthy().items()):
            if index in devices:
                problems.append(f"GPU {index} is marked unhealthy ({reason}); reset it first")
    return problems


def gpu_pids(n: Nvml, index: int) -> dict[int, int | None]:
    """pid -> GPU memory in bytes of the compute processes on one GPU."""
    handle = n.nvmlDeviceGetHandleByIndex(index)
    found: dict[int, int | None] = {}
    for proc in n.nvmlDeviceGetComputeRunningProcesses(handle):
        used = proc.usedGpuMemory
        found[int(proc.pid)] = None if used is None else int(used)
    return found


def wait_for_memory_release(
    devices: Sequence[int],
    pids: Sequence[int],
    timeout: float,
    *,
    nvml: Nvml | None = None,
    poll: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Wait until none of `pids` (the previous attempt's) holds memory on `devices`.

    Returns what still holds memory at the timeout (empty: released). NVML
    reports host pids: in a container with its own pid namespace they do not
    match, and this returns at once. Without NVML there is nothing to wait for.
    """
    wanted = set(pids)
    if not devices or not wanted:
        return []
    try:
        with nvml_session(nvml) as n:
            deadline = clock() + timeout
            while True:
                held = _held(n, devices, wanted)
                if not held or clock() >= deadline:
                    return [f"{line} after {timeout:.0f} s" for line in held]
                sleep(poll)
    except NvmlUnavailable:
        return []


def _held(n: Nvml, devices: Sequence[int], wanted: set[int]) -> list[str]:
    held = []
    for index in devices:
        try:
            procs = gpu_pids(n, index)
        except n.NVMLError:
            continue  # check_devices reports a GPU that does not answer
        for pid in sorted(wanted & procs.keys()):
            used = procs[pid]
            size = f"{used / 2**30:.1f} GiB" if used is not None else "memory"
            held.append(f"GPU {index}: pid {pid} still holds {size}")
    return held


def supports_bf16(index: int, *, nvml: Nvml | None = None) -> bool | None:
    """Compute capability >= 8.0; None when it cannot be told (no NVML, no such GPU)."""
    try:
        with nvml_session(nvml) as n:
            try:
                handle = n.nvmlDeviceGetHandleByIndex(index)
                major, minor = n.nvmlDeviceGetCudaComputeCapability(handle)
            except n.NVMLError:
                return None
    except NvmlUnavailable:
        return None
    return (int(major), int(minor)) >= BF16_MIN_CAPABILITY


def bf16_problems(devices: Sequence[int], *, nvml: Nvml | None = None) -> list[str]:
    """For a job that asks for bf16: the GPUs that cannot do it."""
    problems = []
    for index in devices:
        if supports_bf16(index, nvml=nvml) is False:
            problems.append(
                f"GPU {index} has no bf16 (compute capability below 8.0); use fp16 or another GPU"
            )
    return problems
