"""The daemon with the real built-in trainer on a tiny local model: drift is refused
unless accepted, and a resumed run's losses match the ones logged before."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftsup.supervisor.procinfo import group_members
from ftsup.trainer.demo import prepare_demo
from tests.supervisor_harness import Harness, wait_for

pytestmark = pytest.mark.slow  # trains real models: starts first (tests/conftest.py)

FINAL = ("finished", "failed", "gave_up")


def _step(daemon: Harness, job: str) -> int:
    return int((daemon.status(job)["progress"] or {}).get("step", 0))


def _with_batch_size(job_file: Path, size: int) -> None:
    text = job_file.read_text()
    job_file.write_text(
        re.sub(r"per_device_train_batch_size = \d+", f"per_device_train_batch_size = {size}", text)
    )


def test_resume_after_a_batch_size_change_is_refused_unless_accepted(daemon: Harness) -> None:
    job_file = prepare_demo(daemon.work / "demo", steps=16, name="drifty")
    # No warm standby: nothing here restarts within a run, and a standby warming up
    # beside the trainer (torch's default: a thread per core each) slows every step.
    job_file.write_text(job_file.read_text().replace("[restart]\n", "[restart]\nstandby = false\n"))
    daemon.cli("start", str(job_file))
    first = daemon.wait_state("drifty", *FINAL, timeout=300)
    assert first["state"] == "finished"

    # Resubmit with a longer run and another batch size: resuming would change the data order.
    text = job_file.read_text().replace("max_steps = 16", "max_steps = 20")
    job_file.write_text(text)
    _with_batch_size(job_file, 8)
    daemon.cli("start", str(job_file))
    refused = daemon.wait_state("drifty", *FINAL, timeout=120)
    assert refused["state"] == "failed"
    assert "refusing to resume from checkpoint-16" in refused["reason"]
    assert "per-device batch size changed from 16 to 8" in refused["reason"]
    assert "--accept-drift" in refused["reason"]

    daemon.cli("start", str(job_file), "--accept-drift")
    accepted = daemon.wait_state("drifty", *FINAL, timeout=300)
    assert accepted["state"] == "finished", accepted
    assert accepted["attempt_history"][-1]["resume_from"].endswith("checkpoint-16")
    drift = [e for e in daemon.cli_json("events", "drifty")["events"] if e["kind"] == "drift"]
    assert drift and "batch size" in drift[0]["message"]


def test_two_process_job_stops_gracefully_and_resumes_under_the_daemon(daemon: Harness) -> None:
    """torchrun (through the trainer's wrapper) under the shim: stop saves and exits 75
    on every rank, restart resumes, nothing is left behind."""
    job_file = prepare_demo(daemon.work / "ddp", steps=400, name="ddp")
    job_file.write_text(job_file.read_text() + "\n[launch]\nnproc_per_node = 2\n")
    daemon.cli("start", str(job_file))
    wait_for(lambda: _step(daemon, "ddp") >= 5, 180, 0.1, "step 5 under torchrun")
    pgid = daemon.attempt_pids("ddp")[0]["pgid"]
    stopped = daemon.cli_json("stop", "ddp", "--wait")
    assert stopped["state"] == "stopped"
    assert stopped["last_exit"]["returncode"] == 75, stopped["last_exit"]
    saved = stopped["last_exit"]["last_step"]
    assert (daemon.work / "ddp" / "output" / f"checkpoint-{saved}").is_dir()
    assert not group_members(pgid)
    config = daemon.state_dir / "runs" / "ddp" / "train.json"
    assert not _workers_left(config)
    daemon.cli("restart", "ddp")
    wait_for(
        lambda: daemon.status("ddp")["state"] == "running" and _step(daemon, "ddp") > saved,
        180,
        0.1,
        "the resumed run to pass the saved step",
    )
    resumed = daemon.status("ddp")["attempt_history"][-1]
    assert resumed["resume_from"].endswith(f"checkpoint-{saved}")
    assert len(_workers_left(config)) >= 3  # the launcher and two ranks: the probe sees them
    daemon.cli("stop", "ddp", "--now", "--wait")
    wait_for(lambda: not _workers_left(config), 10, what="every rank to be gone")


def _workers_left(config: Path) -> list[int]:
    """Trainer processes (launcher and ranks) still running with this job's config."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ftsup.trainer" in cmdline and str(config).encode() in cmdline:
            found.append(int(entry.name))
    return found
