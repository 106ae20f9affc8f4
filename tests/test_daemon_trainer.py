"""The daemon with the real built-in trainer on a tiny local model: drift is refused
unless accepted, and a resumed run's losses match the ones logged before."""

from __future__ import annotations

import re
from pathlib import Path

from ftsup.trainer.demo import prepare_demo
from tests.supervisor_harness import Harness


def _with_batch_size(job_file: Path, size: int) -> None:
    text = job_file.read_text()
    job_file.write_text(
        re.sub(r"per_device_train_batch_size = \d+", f"per_device_train_batch_size = {size}", text)
    )


def test_resume_after_a_batch_size_change_is_refused_unless_accepted(daemon: Harness) -> None:
    job_file = prepare_demo(daemon.work / "demo", steps=16, name="drifty")
    daemon.cli("start", str(job_file))
    first = daemon.wait_state("drifty", "finished", "failed", "gave_up", timeout=300)
    assert first["state"] == "finished"

    # Resubmit with a longer run and another batch size: resuming would change the data order.
    text = job_file.read_text().replace("max_steps = 16", "max_steps = 20")
    job_file.write_text(text)
    _with_batch_size(job_file, 8)
    daemon.cli("start", str(job_file))
    refused = daemon.wait_state("drifty", "finished", "failed", "gave_up", timeout=120)
    assert refused["state"] == "failed"
    assert "refusing to resume from checkpoint-16" in refused["reason"]
    assert "per-device batch size changed from 16 to 8" in refused["reason"]
    assert "--accept-drift" in refused["reason"]

    daemon.cli("start", str(job_file), "--accept-drift")
    accepted = daemon.wait_state("drifty", "finished", "failed", "gave_up", timeout=300)
    assert accepted["state"] == "finished", accepted
    assert accepted["attempt_history"][-1]["resume_from"].endswith("checkpoint-16")
    drift = [e for e in daemon.cli_json("events", "drifty")["events"] if e["kind"] == "drift"]
    assert drift and "batch size" in drift[0]["message"]
