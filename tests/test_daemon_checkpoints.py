"""The daemon's checkpoint care on a live run: watched and recorded, rotated by step,
listed over the socket, and a filling disk pauses the run before ENOSPC."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftsup.supervisor.client import Client
from tests.disks import tmpfs
from tests.supervisor_harness import Harness, wait_for


def _events(h: Harness, job: str) -> list[dict[str, object]]:
    return list(h.cli_json("events", job, "-n", "500")["events"])


def test_each_finished_checkpoint_is_recorded_and_announced(daemon: Harness) -> None:
    job = daemon.toy_job("watched", "--max-steps", "12", "--save-steps", "3", "--step-time", "0.1")
    daemon.cli("start", str(job))
    daemon.wait_state("watched", "finished", "gave_up", "failed")
    wait_for(
        lambda: len([e for e in _events(daemon, "watched") if e["kind"] == "checkpoint"]) >= 4,
        15,
        what="four checkpoint events",
    )
    announced = sorted(
        e["message"] for e in _events(daemon, "watched") if e["kind"] == "checkpoint"
    )
    assert announced == [f"checkpoint-{n} valid" for n in (12, 3, 6, 9)]
    with Client(daemon.runtime_dir / "ftsup.sock") as client:
        listing = client.request("checkpoints", job="watched")
    steps = [c["step"] for c in listing["checkpoints"]]
    assert steps == [3, 6, 9, 12]
    assert all(c["valid"] and c["resumable"] for c in listing["checkpoints"])
    assert [c["resume_candidate"] for c in listing["checkpoints"]] == [False] * 3 + [True]
    # `ftsup ckpt ls JOB` asks the daemon for the job's output folder.
    by_name = daemon.cli_json("ckpt", "ls", "watched")
    assert [c["step"] for c in by_name["checkpoints"]] == [3, 6, 9, 12]
    assert by_name["resume_from"].endswith("checkpoint-12")


def test_keep_last_rotates_by_step_and_keeps_the_newest(daemon: Harness) -> None:
    job = daemon.toy_job(
        "rotating",
        "--max-steps",
        "16",
        "--save-steps",
        "2",
        "--step-time",
        "0.15",
        extra="\n[checkpoint]\nkeep_last = 2\n",
    )
    out = daemon.work / "rotating"
    daemon.cli("start", str(job))
    daemon.wait_state("rotating", "finished", "gave_up", "failed")
    wait_for(
        lambda: (
            sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-14", "checkpoint-16"]
        ),
        15,
        what="rotation to two checkpoints",
    )
    assert any(e["kind"] == "retention" for e in _events(daemon, "rotating"))


@pytest.fixture
def tiny_disk(harness: Harness) -> Iterator[Path]:
    """A 600 KiB tmpfs: a real filesystem that fills up (needs root and mount)."""
    try:
        with tmpfs(harness.work / "tiny", "600k") as mount_point:
            yield mount_point
    finally:
        harness.cleanup_processes()


def test_filling_disk_pauses_the_run_before_enospc_and_it_resumes_when_space_returns(
    daemon: Harness,
    tiny_disk: Path,
) -> None:
    ballast = tiny_disk / "ballast.bin"
    # Each checkpoint takes 64 KiB on disk. With 270 KiB free the guard pauses the run
    # after the third (68 KiB left < room for two); the save the pause asks for still
    # fits. Removing the ballast makes room for the rest of the run.
    ballast.write_bytes(b"\0" * 330 * 1024)
    job = daemon.toy_job(
        "filling",
        "--max-steps",
        "12",
        "--save-steps",
        "2",
        "--step-time",
        "0.3",
        "--ckpt-padding",
        str(40 * 1024),
        output="tiny/run",
    )
    daemon.cli("start", str(job))
    wait_for(
        lambda: any(e["kind"] == "launch_wait" for e in _events(daemon, "filling")),
        60,
        what="the run to be paused for disk space",
    )
    events = _events(daemon, "filling")
    pause = [e for e in events if e["kind"] == "disk_guard" and "pausing" in str(e["message"])]
    assert pause, events
    first = daemon.status("filling")["attempt_history"][0]
    assert first["returncode"] == 75  # it saved and stopped; it did not crash on ENOSPC
    log = (daemon.state_dir / "runs" / "filling" / "attempt-1" / "stdout.log").read_text()
    assert "No space left" not in log
    assert daemon.status("filling")["state"] == "backoff"
    os.unlink(ballast)  # space returns
    status = daemon.wait_state("filling", "finished", "gave_up", "failed", timeout=60)
    assert status["state"] == "finished"
    steps = daemon.steps("filling", output="tiny/run")
    assert sorted(set(steps)) == list(range(1, 13)) and len(steps) == 12
