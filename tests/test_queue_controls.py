"""Steering the GPU queue under a real daemon with simulated GPUs (issue 15):
`ftsup priority` reorders it and outlives the daemon; a (re)launch waits while
memory on the job's GPUs is held by processes that are not the job's (the
dying run's, another user's), up to daemon.toml's `[gpu] foreign_memory_limit`;
torchrun inside a `count` job runs one process per placed GPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ftsup.supervisor.spec_types import JobSpec
from tests.supervisor_harness import Harness, wait_for
from tests.test_gpu_queue import LONG, queued_job, running_on, with_gpus
from tests.test_instrumentation_status import trainer_environ


def waiting_order(daemon: Harness) -> list[str]:
    return [w["job"] for w in daemon.cli_json("queue")["waiting"]]


def test_priority_reorders_the_queue_and_a_new_daemon_keeps_it(harness: Harness) -> None:
    daemon = with_gpus(harness, 1)
    daemon.cli("start", str(queued_job(daemon, "holder", *LONG, gpu="count = 1")))
    running_on(daemon, "holder")
    for name in ("early", "late"):
        daemon.cli("start", str(queued_job(daemon, name, *LONG, gpu="count = 1")))
        daemon.wait_state(name, "queued")
    assert waiting_order(daemon) == ["early", "late"]  # submission order at equal priority

    answer = daemon.cli_json("priority", "late", "5")
    assert answer["name"] == "late"
    assert waiting_order(daemon) == ["late", "early"]
    stored = (daemon.state_dir / "runs" / "late" / "job.toml").read_text()
    assert "priority = 5" in stored
    kinds = [(e["kind"], e["data"]) for e in daemon.cli_json("events", "late")["events"]]
    assert ("priority", {"old": 0, "new": 5}) in kinds

    daemon.kill_daemon()
    daemon.start_daemon()
    wait_for(
        lambda: waiting_order(daemon) == ["late", "early"], 120, what="the order after restart"
    )
    refused = daemon.cli("priority", "late", "5000", check=False)
    assert refused.returncode != 0 and "1000" in refused.stderr

    daemon.cli("stop", "holder")
    assert running_on(daemon, "late") == [0]  # the higher priority goes first
    assert daemon.status("early")["state"] == "queued"
    for name in ("late", "early"):
        daemon.cli("stop", name)
        daemon.wait_state(name, "stopped")


def held_by_sleeper(daemon: Harness, gpu: int, size: str) -> subprocess.Popen[bytes]:
    """A live process that, for the simulated GPUs, holds `size` on `gpu` until it exits."""
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    daemon.cli("gpus", "simulate-process", str(gpu), str(sleeper.pid), size)
    return sleeper


def attempts(daemon: Harness, job: str) -> int:
    """Attempts launched so far (a restart on request starts a new history)."""
    events = daemon.cli_json("events", job)["events"]
    return sum(1 for e in events if e["kind"] == "attempt_started")


def test_a_relaunch_waits_for_memory_that_is_not_the_jobs(harness: Harness) -> None:
    daemon = with_gpus(harness, 2)
    daemon.cli("start", str(queued_job(daemon, "m", *LONG, gpu="count = 1")))
    (gpu,) = running_on(daemon, "m")
    assert trainer_environ(daemon, "m")["PET_NPROC_PER_NODE"] == "1"  # torchrun: one per GPU
    sleeper = held_by_sleeper(daemon, gpu, "3G")
    try:
        daemon.cli("restart", "m")
        status = daemon.wait_state("m", "queued")
        assert f"GPU {gpu} 3.0 GiB" in status["reason"]
        assert attempts(daemon, "m") == 1  # nothing launched onto the held memory
    finally:
        sleeper.kill()
        sleeper.wait()
    wait_for(lambda: attempts(daemon, "m") == 2, 120, what="the relaunch once the memory is free")
    assert running_on(daemon, "m") == [gpu]  # it kept its GPU meanwhile
    events = daemon.cli_json("events", "m")["events"]
    kinds = [e["kind"] for e in events]
    assert "launch_wait" in kinds
    assert kinds.index("launch_wait") < max(
        i for i, k in enumerate(kinds) if k == "attempt_started"
    )

    # daemon.toml raises the limit: 3 GiB of another process no longer makes it wait.
    config = Path(daemon.state_dir / "daemon.toml")
    config.write_text('[gpu]\nforeign_memory_limit = "4G"\n')
    daemon.kill_daemon()
    daemon.start_daemon()
    daemon.wait_state("m", "running")
    sleeper = held_by_sleeper(daemon, gpu, "3G")
    try:
        daemon.cli("restart", "m")
        wait_for(lambda: attempts(daemon, "m") == 3, 120, what="a relaunch under the higher limit")
        daemon.wait_state("m", "running")
    finally:
        sleeper.kill()
        sleeper.wait()
    daemon.cli("stop", "m")
    daemon.wait_state("m", "stopped")


def test_simulate_process_is_refused_on_real_gpus(daemon: Harness) -> None:
    refused = daemon.cli("gpus", "simulate-process", "0", "1", "1G", check=False)
    assert refused.returncode == 5 and "simulated" in refused.stderr


TRAIN_JOB = """[job]
name = "t"
output_dir = "out"
[train]
model = "m"
dataset = "d.jsonl"
per_device_train_batch_size = 2
gradient_accumulation_steps = 4
{extra}
"""


def test_a_train_job_runs_one_process_per_gpu_and_elastic_is_checked(tmp_path: Path) -> None:
    from ftsup.supervisor.daemon.launcher import global_batch, launch_for
    from ftsup.supervisor.spec import SpecError, parse_spec

    def parse(extra: str) -> JobSpec:
        return parse_spec(TRAIN_JOB.format(extra=extra), tmp_path / "t.toml")

    assert parse("[gpu]\ncount = 4").launch.nproc_per_node == 4
    assert parse("[gpu]\ncount = 4\n[launch]\nnproc_per_node = 1").launch.nproc_per_node == 1
    assert parse("[gpu]\ndevices = [0, 1]").launch.nproc_per_node == 1  # as written
    elastic = parse("[gpu]\ncount = 4\nelastic = true")
    assert global_batch(elastic) == 2 * 4 * 4
    assert launch_for(elastic, (0, 1)).nproc_per_node == 2  # one process per GPU placed
    assert launch_for(parse("[gpu]\ncount = 4"), (0, 1)).nproc_per_node == 4  # not elastic
    for extra, message in (
        ("[gpu]\nelastic = true", "needs count"),
        ("[gpu]\ncount = 2\nelastic = true\n[launch]\nnproc_per_node = 2", "set by ftsup"),
    ):
        with pytest.raises(SpecError, match=message):
            parse(extra)
    command = '[job]\nname = "c"\noutput_dir = "o"\n[command]\nargv = ["x"]\n'
    with pytest.raises(SpecError, match="only for a \\[train\\] job"):
        parse_spec(command + "[gpu]\ncount = 2\nelastic = true\n", tmp_path / "c.toml")


def test_daemon_toml_sets_the_foreign_memory_limit(tmp_path: Path) -> None:
    from ftsup.supervisor.spec import SpecError, parse_daemon_config

    source = tmp_path / "daemon.toml"
    assert parse_daemon_config("", source).gpu.foreign_memory_limit == 1 << 30
    limit = parse_daemon_config('[gpu]\nforeign_memory_limit = "512M"\n', source)
    assert limit.gpu.foreign_memory_limit == 512 << 20
    with pytest.raises(SpecError, match='did you mean "foreign_memory_limit"'):
        parse_daemon_config('[gpu]\nforeign_memory_limt = "1G"\n', source)
    with pytest.raises(SpecError, match="count"):  # a job's key is not a daemon setting
        parse_daemon_config("[gpu]\ncount = 2\n", source)
