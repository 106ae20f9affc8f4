"""GPU faults reach the runs: a daemon in this process, NVML replayed by the double
that returns what the real library returns (this machine has no GPU)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from ftsup.supervisor.client import Client
from ftsup.supervisor.daemon.app import Daemon
from ftsup.supervisor.paths import Layout
from tests.health.nvml_double import FakeGpu, FakeNvml
from tests.supervisor_harness import Harness, wait_for

GPU_JOB = "\n[gpu]\ndevices = [0]\n"


@pytest.fixture
def gpu_daemon(harness: Harness) -> Iterator[tuple[Harness, FakeNvml]]:
    fake = FakeNvml([FakeGpu(), FakeGpu(uuid="GPU-second")])
    daemon = Daemon(Layout.from_env(harness.state_dir, harness.runtime_dir), nvml=fake.module)
    thread = threading.Thread(target=lambda: asyncio.run(daemon.run()), daemon=True)
    thread.start()
    wait_for(lambda: harness.cli("ls", check=False).returncode == 0, 20, what="the daemon")
    try:
        yield harness, fake
    finally:
        with Client(harness.runtime_dir / "ftsup.sock") as client:
            client.request("shutdown")
        thread.join(20)


def _events(h: Harness, job: str) -> list[dict[str, object]]:
    return list(h.cli_json("events", job)["events"])


def test_application_xid_restarts_the_run_and_fatal_xid_stops_it(
    gpu_daemon: tuple[Harness, FakeNvml],
) -> None:
    h, fake = gpu_daemon
    job = h.toy_job("ongpu", "--max-steps", "2000", "--step-time", "0.05", extra=GPU_JOB)
    h.cli("start", str(job))
    wait_for(lambda: h.status("ongpu")["progress"]["step"] >= 3, what="step 3")

    fake.push_xid(0, 13)  # graphics engine exception: an application error
    wait_for(
        lambda: h.status("ongpu")["attempts"] >= 2 and h.status("ongpu")["state"] == "running",
        30,
        what="the restart",
    )
    first = h.status("ongpu")["attempt_history"][0]
    assert first["failure_kind"] == "killed" and "gpu-fault" in first["reason"]

    fake.push_xid(0, 79)  # fallen off the bus: stop and mark the GPU
    status = h.wait_state("ongpu", "stopped", "gave_up", "failed", timeout=30)
    assert status["state"] == "stopped"
    with Client(h.runtime_dir / "ftsup.sock") as client:
        snapshot = client.request("gpus")
    by_index = {g["index"]: g for g in snapshot["gpus"]}
    assert by_index[0]["healthy"] is False and by_index[1]["healthy"] is True
    assert by_index[0]["util"] == 97 and by_index[0]["series"]["util"]
    kinds = [e["kind"] for e in _events(h, "ongpu")]
    assert kinds.count("gpu_fault") == 2


def test_no_run_is_placed_on_an_unhealthy_gpu_until_it_is_reset(
    gpu_daemon: tuple[Harness, FakeNvml],
) -> None:
    h, fake = gpu_daemon
    fake.push_xid(0, 79)
    with Client(h.runtime_dir / "ftsup.sock") as client:
        wait_for(
            lambda: not {g["index"]: g for g in client.request("gpus")["gpus"]}[0]["healthy"],
            10,
            what="GPU 0 unhealthy",
        )
    job = h.toy_job("patient", "--max-steps", "3", extra=GPU_JOB)
    h.cli("start", str(job))
    # It waits in the GPU queue, saying why (issue 15); nothing is launched.
    status = h.wait_state("patient", "queued", timeout=10)
    assert "unhealthy" in status["reason"] and status["attempts"] == 0
    with Client(h.runtime_dir / "ftsup.sock") as client:
        client.request("gpu_reset", index=0)
    assert h.wait_state("patient", "finished", "failed", timeout=30)["state"] == "finished"


def test_job_naming_gpus_fails_clearly_where_there_is_no_gpu(daemon: Harness) -> None:
    job = daemon.toy_job("needsgpu", "--max-steps", "3", extra=GPU_JOB)
    daemon.cli("start", str(job))
    status = daemon.wait_state("needsgpu", "failed", "finished", timeout=20)
    assert status["state"] == "failed" and "GPU monitor off" in status["reason"]
    assert status["attempts"] == 0
    assert daemon.cli("ls", check=False).returncode == 0  # the daemon itself is unaffected
