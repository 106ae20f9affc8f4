"""Simulated GPUs (FTSUP_SIMULATE_GPUS): the pynvml subset the monitor, the launch
checks and `ftsup gpus` use, and a real daemon whose injected XIDs take the path
of real ones (the monitor's XID thread, health, the jobs' xid_actions)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pynvml
import pytest

from ftsup.supervisor.cli.gpus_cmd import read_gpus
from ftsup.supervisor.client import Client
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.gpus import GpuSupervision
from ftsup.supervisor.health.gpu import GpuMonitor
from ftsup.supervisor.health.gpu_checks import (
    check_devices,
    gpu_pids,
    supports_bf16,
    wait_for_memory_release,
)
from ftsup.supervisor.health.simulated import (
    SimulatedGpus,
    SimulationError,
    from_env,
    parse_simulate_gpus,
)
from ftsup.supervisor.store import Store
from tests.health.conftest import Events
from tests.health.nvml_double import FakeGpu, FakeNvml, GiB
from tests.supervisor_harness import Harness, wait_for

ENV = "FTSUP_SIMULATE_GPUS"

# --- parsing ---------------------------------------------------------------------------------


def test_count_and_memory_are_read_from_the_variable() -> None:
    assert parse_simulate_gpus("4") == (4, 80)
    assert parse_simulate_gpus(" 8:24 ") == (8, 24)
    assert from_env({}) is None and from_env({ENV: ""}) is None
    gpus = from_env({ENV: "2:16"})
    assert gpus is not None and (gpus.count, gpus.memory_gib) == (2, 16)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("four", "not a number"),
        ("4:big", "not a number"),
        ("0", "the GPU count must be 1..64"),
        ("65", "the GPU count must be 1..64"),
        ("4:0", "the memory per GPU must be 1..4096 GiB"),
    ],
)
def test_a_bad_value_names_the_variable_the_value_and_the_fix(value: str, problem: str) -> None:
    with pytest.raises(SimulationError) as caught:
        from_env({ENV: value})
    message = str(caught.value)
    assert message.startswith(f"{ENV}={value!r}: {problem}")
    assert "set it to N or N:MEM_GIB" in message and "unset it" in message


# --- the pynvml subset ------------------------------------------------------------------------


@pytest.fixture
def sim_monitor(events: Events) -> Any:
    gpus = SimulatedGpus(4, 24)
    monitor = GpuMonitor(nvml=gpus, interval=3600, history=5, on_event=events, event_wait=0.1)
    yield gpus, monitor
    monitor.stop()


def test_the_monitor_sees_healthy_idle_gpus(sim_monitor: tuple[SimulatedGpus, GpuMonitor]) -> None:
    _, monitor = sim_monitor
    status = monitor.start()
    assert status.active and status.xid_events
    assert status.message == "GPU monitor on: 4 GPUs, driver simulated; XID events on"
    monitor.sample_once()
    reading = monitor.reading()
    assert [g["index"] for g in reading["gpus"]] == [0, 1, 2, 3]
    assert len({g["uuid"] for g in reading["gpus"]}) == 4
    for gpu in reading["gpus"]:
        assert gpu["healthy"] is True and gpu["name"] == "Simulated GPU"
        assert gpu["compute_capability"] == "9.0"
        assert (gpu["util"], gpu["mem_used"], gpu["mem_total"]) == (0, 0, 24 * GiB)
        latest = gpu["latest"]
        assert "errors" not in latest  # every metric the monitor reads is answered
        assert latest["clock_events"] == ["gpu_idle"] and latest["remap_failure"] is False
        assert latest["ecc_volatile_uncorrected"] == 0 and latest["pcie_replay"] == 0


def test_an_injected_xid_reaches_the_monitor_like_a_real_one(
    sim_monitor: tuple[SimulatedGpus, GpuMonitor], events: Events
) -> None:
    gpus, monitor = sim_monitor
    monitor.start()
    assert gpus.inject_xid(2, 13) == 1  # one listener: the monitor's event set
    event = events.next()
    assert (event.kind, event.index, event.xid, event.action) == ("xid", 2, 13, "restart")
    assert monitor.unhealthy() == {}
    gpus.inject_xid(1, 79)
    event = events.next()
    assert (event.index, event.xid, event.action) == (1, 79, "stop")
    assert event.uuid == monitor.reading()["gpus"][1]["uuid"]
    assert monitor.unhealthy() == {1: "XID 79: GPU has fallen off the bus"}
    assert events.threads == {"ftsup-gpu-xid"}


def test_xids_injected_from_many_threads_all_arrive(
    sim_monitor: tuple[SimulatedGpus, GpuMonitor], events: Events
) -> None:
    gpus, monitor = sim_monitor
    monitor.start()
    senders = [
        threading.Thread(target=lambda i=i: [gpus.inject_xid(i, 63) for _ in range(25)])
        for i in range(4)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    got = [events.next() for _ in range(100)]
    assert sorted((e.index, e.xid) for e in got) == sorted(
        (i, 63) for i in range(4) for _ in "x" * 25
    )
    assert events.queue.empty()


def test_event_wait_times_out_and_errors_are_pynvmls() -> None:
    gpus = SimulatedGpus(2)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        gpus.nvmlDeviceGetCount()
    gpus.nvmlInit()
    event_set = gpus.nvmlEventSetCreate()
    assert gpus.inject_xid(0, 79) == 0  # nobody registered: the XID is lost, as on a real GPU
    with pytest.raises(pynvml.NVMLError_Timeout) as caught:
        gpus.nvmlEventSetWait_v2(event_set, 10)
    assert caught.value.value == pynvml.NVML_ERROR_TIMEOUT
    handle = gpus.nvmlDeviceGetHandleByIndex(1)
    gpus.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
    gpus.inject_xid(1, 48)
    data = gpus.nvmlEventSetWait(event_set, 1000)
    assert isinstance(data, pynvml.c_nvmlEventData_t)
    assert gpus.nvmlDeviceGetIndex(data.device) == 1 and data.eventData == 48
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        gpus.nvmlDeviceGetHandleByIndex(2)
    with pytest.raises(IndexError, match=r"GPU 2 does not exist: the simulated GPUs are 0\.\.1"):
        gpus.inject_xid(2, 79)
    with pytest.raises(AttributeError):
        gpus.nvmlDeviceGetFanSpeed  # noqa: B018 - not simulated: absent, not faked
    gpus.nvmlEventSetFree(event_set)
    gpus.nvmlShutdown()


def test_topology_pairs_share_a_switch() -> None:
    gpus = SimulatedGpus(8)
    gpus.nvmlInit()
    h = [gpus.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
    level = gpus.nvmlDeviceGetTopologyCommonAncestor
    assert level(h[0], h[0]) == pynvml.NVML_TOPOLOGY_INTERNAL
    assert level(h[2], h[3]) == level(h[6], h[7]) == pynvml.NVML_TOPOLOGY_SINGLE
    assert level(h[1], h[2]) == pynvml.NVML_TOPOLOGY_NODE
    assert level(h[3], h[4]) == pynvml.NVML_TOPOLOGY_SYSTEM
    nearest = gpus.nvmlDeviceGetTopologyNearestGpus(h[2], pynvml.NVML_TOPOLOGY_SINGLE)
    assert [gpus.nvmlDeviceGetIndex(d) for d in nearest] == [3]
    node = gpus.nvmlDeviceGetTopologyNearestGpus(h[5], pynvml.NVML_TOPOLOGY_NODE)
    assert [gpus.nvmlDeviceGetIndex(d) for d in node] == [4, 6, 7]


def test_compute_processes_and_the_launch_checks() -> None:
    gpus = SimulatedGpus(4, 40)
    gpus.nvmlInit()
    handle = gpus.nvmlDeviceGetHandleByIndex(1)
    assert gpus.nvmlDeviceGetComputeRunningProcesses(handle) == []
    pid = os.getpid()  # a live process: the simulated GPUs, like NVML, list only those
    gpus.set_processes(1, {pid: 3 * GiB})
    (proc,) = gpus.nvmlDeviceGetComputeRunningProcesses(handle)
    assert (proc.pid, proc.usedGpuMemory) == (pid, 3 * GiB)
    memory = gpus.nvmlDeviceGetMemoryInfo(handle)
    assert (memory.used, memory.free, memory.total) == (3 * GiB, 37 * GiB, 40 * GiB)
    assert gpus.nvmlDeviceGetMemoryInfo(handle, pynvml.nvmlMemory_v2).used == 3 * GiB
    gpus.nvmlShutdown()
    # What the daemon asks before a launch, through the same object:
    assert gpu_pids_of(gpus, 1) == {pid: 3 * GiB}
    assert check_devices([0, 5], nvml=gpus) == ["GPU 5 does not exist (this machine has 4)"]
    assert supports_bf16(0, nvml=gpus) is True
    held = wait_for_memory_release([1], [pid], 0, nvml=gpus, sleep=lambda _: None)
    assert held == [f"GPU 1: pid {pid} still holds 3.0 GiB after 0 s"]
    gpus.set_processes(1, {})
    assert wait_for_memory_release([1], [pid], 0, nvml=gpus) == []


def gpu_pids_of(gpus: SimulatedGpus, index: int) -> dict[int, int | None]:
    gpus.nvmlInit()
    try:
        return gpu_pids(gpus, index)
    finally:
        gpus.nvmlShutdown()


def test_a_process_that_exits_no_longer_holds_memory() -> None:
    """As NVML: memory is listed only while its process lives (hold_memory is what
    `ftsup gpus simulate-process` sets in the daemon)."""
    gpus = SimulatedGpus(2, 40)
    gpus.nvmlInit()
    holder = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        gpus.hold_memory(holder.pid, 1, 5 * GiB)
        handle = gpus.nvmlDeviceGetHandleByIndex(1)
        (proc,) = gpus.nvmlDeviceGetComputeRunningProcesses(handle)
        assert (proc.pid, proc.usedGpuMemory) == (holder.pid, 5 * GiB)
        assert gpus.nvmlDeviceGetMemoryInfo(handle).used == 5 * GiB
    finally:
        holder.kill()
        holder.wait()
    assert gpus.nvmlDeviceGetComputeRunningProcesses(handle) == []
    assert gpus.nvmlDeviceGetMemoryInfo(handle).used == 0
    gpus.nvmlShutdown()


def test_ftsup_gpus_reads_them_in_the_shape_it_reads_nvml() -> None:
    simulated = read_gpus(SimulatedGpus(2))
    real = read_gpus(FakeNvml([FakeGpu(), FakeGpu(uuid="GPU-second")]).module)
    assert simulated["simulated"] is True and real["simulated"] is False
    assert set(simulated) == set(real)
    assert set(simulated["gpus"][0]) == set(real["gpus"][0])
    assert set(simulated["gpus"][0]["latest"]) == set(real["gpus"][0]["latest"])
    assert json.loads(json.dumps(simulated)) == simulated  # plain JSON all the way down


def test_the_daemon_reads_switch_groups_and_processes_for_placement(tmp_path: Path) -> None:
    gpus = SimulatedGpus(6)
    gpus.set_processes(3, {os.getpid(): 2 * GiB})
    supervision = GpuSupervision(EventBus(Store(tmp_path / "db.sqlite")), {}, gpus)

    async def started() -> None:
        await supervision.start()
        await supervision.close()

    asyncio.run(started())
    assert supervision.groups == {0: 0, 1: 0, 2: 2, 3: 2, 4: 4, 5: 4}
    assert supervision.simulated is gpus
    supervision.monitor.start()
    try:
        processes = supervision.gpu_processes()
    finally:
        supervision.monitor.stop()
    assert processes == {0: {}, 1: {}, 2: {}, 3: {os.getpid(): 2 * GiB}, 4: {}, 5: {}}
    # GPUs whose driver cannot tell topology (as NVML says it): no groups, not a failure.
    blind = GpuSupervision(EventBus(Store(tmp_path / "b.sqlite")), {}, _NoTopology(2))
    blind.monitor.start()
    try:
        assert blind.topology_groups() == {}
    finally:
        blind.monitor.stop()


class _NoTopology(SimulatedGpus):
    def nvmlDeviceGetTopologyCommonAncestor(self, device1: Any, device2: Any) -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


# --- a real daemon ----------------------------------------------------------------------------


def _daemon(h: Harness, kind: str, **args: Any) -> dict[str, Any]:
    with Client(h.runtime_dir / "ftsup.sock") as client:
        return dict(client.request(kind, **args))


def _stepping(h: Harness, job: str) -> bool:
    return bool(h.status(job)["progress"]["step"] >= 3)


def _gpu_events(h: Harness, job: str) -> list[dict[str, Any]]:
    return [e for e in h.cli_json("events", job)["events"] if e["kind"] == "gpu_fault"]


def test_a_daemon_with_simulated_gpus_acts_on_an_injected_xid(harness: Harness) -> None:
    h = harness
    h.env[ENV] = "4"
    h.start_daemon()
    shown = h.cli_json("gpus")
    assert shown["simulated"] is True and shown["available"] is True
    assert [(g["index"], g["healthy"]) for g in shown["gpus"]] == [(i, True) for i in range(4)]
    assert {g["mem_total"] for g in shown["gpus"]} == {80 * GiB}
    assert "GPUs are simulated (FTSUP_SIMULATE_GPUS=4)" in h.daemon_log()

    args = ("--max-steps", "5000", "--step-time", "0.05")
    h.cli("start", str(h.toy_job("on1", *args, extra="\n[gpu]\ndevices = [1]\n")))
    h.cli("start", str(h.toy_job("on2", *args, extra="\n[gpu]\ndevices = [2]\n")))
    wait_for(lambda: _stepping(h, "on1") and _stepping(h, "on2"), 60, what="both at step 3")

    # XID 13 (an application error): the run on GPU 2 restarts, the GPU stays healthy.
    answer = h.cli_json("gpus", "simulate-xid", "2", "13")
    assert answer["simulated"] is True and answer["gpus"][2]["healthy"] is True
    wait_for(
        lambda: h.status("on2")["attempts"] >= 2 and h.status("on2")["state"] == "running",
        60,
        what="on2 to restart",
    )
    assert [e["data"]["action"] for e in _gpu_events(h, "on2")] == ["restart"]

    # XID 79 (fallen off the bus): GPU 1 unhealthy, its run stopped, the other one untouched.
    attempts_on2 = h.status("on2")["attempts"]
    answer = h.cli_json("gpus", "simulate-xid", "1", "79")
    assert answer["gpus"][1]["healthy"] is False
    assert answer["gpus"][1]["unhealthy_reason"] == "XID 79: GPU has fallen off the bus"
    assert h.wait_state("on1", "stopped", "failed", "gave_up", timeout=60)["state"] == "stopped"
    (fault,) = _gpu_events(h, "on1")
    assert (fault["data"]["xid"], fault["data"]["index"], fault["data"]["action"]) == (
        79,
        1,
        "stop",
    )
    daemon_wide = [e for e in h.cli_json("events")["events"] if e["kind"] == "gpu_fault"]
    assert {e["data"]["xid"] for e in daemon_wide} >= {13, 79}
    status_on2 = h.status("on2")
    assert status_on2["state"] == "running" and status_on2["attempts"] == attempts_on2
    shown = h.cli_json("gpus")  # `ftsup gpus` shows the daemon's simulated GPUs
    assert [g["healthy"] for g in shown["gpus"]] == [True, False, True, True]

    bad = h.cli("gpus", "simulate-xid", "7", "79", check=False)
    assert bad.returncode == 2 and "GPU 7 does not exist: the simulated GPUs are 0..3" in bad.stderr

    reset = _daemon(h, "gpu_reset", index=1)
    assert reset["gpus"][1]["healthy"] is True and reset["simulated"] is True
    h.cli("stop", "on2", "--now")


def test_simulate_xid_is_refused_on_a_daemon_without_simulated_gpus(harness: Harness) -> None:
    harness.env.pop(ENV, None)
    harness.start_daemon()
    refused = harness.cli("gpus", "simulate-xid", "0", "79", check=False)
    assert refused.returncode == 5
    assert "simulate-xid works only on simulated GPUs" in refused.stderr
    assert "FTSUP_SIMULATE_GPUS=N" in refused.stderr
    as_json = harness.cli_json("gpus", "simulate-xid", "0", "79", check=False)
    assert as_json["error"]["code"] == "not_simulated"
    assert _daemon(harness, "gpus")["simulated"] is False


def test_a_bad_value_stops_the_daemon_and_ftsup_gpus_with_the_reason(harness: Harness) -> None:
    env = {**harness.env, ENV: "4:lots"}
    daemon = subprocess.run(
        [sys.executable, "-m", "ftsup.supervisor", "daemon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert daemon.returncode == 2
    assert "refusing to start: FTSUP_SIMULATE_GPUS='4:lots': not a number" in daemon.stderr
    gpus = subprocess.run(
        [sys.executable, "-m", "ftsup.supervisor", "gpus"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gpus.returncode == 2 and "FTSUP_SIMULATE_GPUS='4:lots'" in gpus.stderr


def test_without_a_daemon_ftsup_gpus_shows_a_fresh_simulated_set(harness: Harness) -> None:
    harness.env[ENV] = "2:16"
    shown = harness.cli_json("gpus")
    assert shown["simulated"] is True
    assert [(g["index"], g["healthy"], g["mem_total"]) for g in shown["gpus"]] == [
        (0, True, 16 * GiB),
        (1, True, 16 * GiB),
    ]
    harness.env["COLUMNS"] = "200"  # no wrapped names
    table = harness.cli("gpus").stdout
    assert "simulated GPUs (FTSUP_SIMULATE_GPUS)" in table and "Simulated GPU" in table
