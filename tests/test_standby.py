"""The warm standby under a real daemon, with the real built-in trainer on a tiny model.

A killed run is taken over by the standby (no new process) and ends bit-identical
to the same run restarted cold; a standby never outlives its daemon, is replaced
when it dies, and leaves nothing behind when the job stops.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.contract import ENV_FAULT_STEP_DELAY
from ftsup.supervisor.procinfo import group_members, is_same_process
from ftsup.trainer.demo import prepare_demo
from tests.supervisor_harness import Harness, wait_for

pytestmark = pytest.mark.slow  # trains real models: starts first (tests/conftest.py)

STEPS = 400  # a checkpoint every 50 steps; about 15 s of training here
FINAL = ("finished", "failed", "gave_up")


def _demo_job(daemon: Harness, name: str, *, standby: bool = True) -> Path:
    job = prepare_demo(daemon.work / name, steps=STEPS, name=name)
    if not standby:
        job.write_text(job.read_text().replace("[restart]\n", "[restart]\nstandby = false\n"))
    return job


def _one_thread(daemon: Harness, **env: str) -> None:
    """Restart the daemon (its environment is its trainers') with one torch thread per
    trainer: a run and a standby warming beside it, each with a thread per core,
    oversubscribe the cores and every step crawls."""
    daemon.env.update({"OMP_NUM_THREADS": "1", **env})
    daemon.kill_daemon()
    daemon.start_daemon()


def _events(daemon: Harness, job: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in daemon.cli_json("events", job)["events"] if e["kind"] == kind]


def _ready_standby(daemon: Harness, job: str, *, not_pid: int | None = None) -> dict[str, Any]:
    """The job's standby once it reports ready (and is not the one with `not_pid`)."""

    def ready() -> dict[str, Any] | None:
        standby = daemon.status(job).get("standby")
        if standby and standby["state"] == "ready" and standby["pid"] != not_pid:
            return dict(standby)
        return None

    return dict(wait_for(ready, 120, 0.2, f"a ready standby for {job}"))


def _kill_trainer(daemon: Harness, job: str) -> int:
    pids = daemon.attempt_pids(job)[-1]
    os.killpg(pids["pgid"], signal.SIGKILL)
    return int(pids["trainer_pid"])


def _losses(daemon: Harness, job: str) -> dict[int, float]:
    """Per step, the loss logged last (re-executed steps overwrite the dead attempt's)."""
    progress = daemon.state_dir / "runs" / job / "progress.jsonl"
    losses: dict[int, float] = {}
    for line in progress.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "step" and record.get("loss") is not None:
            losses[record["step"]] = record["loss"]
    return losses


def _attempt_stepped(daemon: Harness, job: str, attempt: int) -> bool:
    """Attempt `attempt` (counting `train_start` records) has reported a step."""
    progress = daemon.state_dir / "runs" / job / "progress.jsonl"
    events = [json.loads(line).get("event") for line in progress.read_text().splitlines()]
    starts = [i for i, event in enumerate(events) if event == "train_start"]
    return len(starts) == attempt and "step" in events[starts[-1] :]


def _first_steps_of_resumed_attempt(daemon: Harness, job: str) -> tuple[dict[str, Any], int]:
    """The resumed attempt's `train_start` record and the first step it reported after it.

    The job's progress.jsonl is shared by its attempts; the dead attempt was killed with
    its whole group before the takeover, so what follows the last `train_start` is the
    resumed attempt's alone.
    """
    progress = daemon.state_dir / "runs" / job / "progress.jsonl"
    records = [json.loads(line) for line in progress.read_text().splitlines()]
    starts = [i for i, r in enumerate(records) if r.get("event") == "train_start"]
    assert len(starts) == 2, f"{job}: expected two train_start records, got {len(starts)}"
    after = records[starts[-1] + 1 :]
    first_step = next(r["step"] for r in after if r.get("event") == "step")
    return records[starts[-1]], int(first_step)


def _assert_resumed_from_its_checkpoint(daemon: Harness, job: str) -> None:
    """The second attempt continued after its checkpoint's step, not from step 0.

    Exact resume makes a run restarted from scratch end with the same weights and
    losses, so only the first step reported after the takeover tells them apart.
    """
    started = _events(daemon, job, "attempt_started")[-1]["data"]
    checkpoint = Path(started["resume_from"])
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    assert step >= 50 and started["start_step"] == step, started
    train_start, first_step = _first_steps_of_resumed_attempt(daemon, job)
    assert train_start["resumed_from"] == str(checkpoint), train_start
    assert train_start["step"] == step, train_start
    assert first_step == step + 1, f"{job} resumed from {checkpoint.name} but ran step {first_step}"


def test_standby_takes_over_a_killed_run_identical_to_a_cold_restart(daemon: Harness) -> None:
    _one_thread(daemon)  # also: the same thread count in both runs
    daemon.cli("start", str(_demo_job(daemon, "warm")))
    daemon.cli("start", str(_demo_job(daemon, "cold", standby=False)))
    standby = _ready_standby(daemon, "warm")
    for job in ("warm", "cold"):
        first_checkpoint = daemon.work / job / "output" / "checkpoint-50"
        wait_for(first_checkpoint.is_dir, 120, what=f"{job}'s first checkpoint")
        assert daemon.status(job)["progress"]["step"] < STEPS, "killed too late to resume"
        _kill_trainer(daemon, job)

    for job in ("warm", "cold"):
        finished = daemon.wait_state(job, *FINAL, timeout=240)
        assert finished["state"] == "finished", finished
        assert finished["attempts"] == 2
    warm_started = _events(daemon, "warm", "attempt_started")[-1]
    assert warm_started["data"]["standby"] is True
    assert "(warm standby)" in warm_started["message"]
    assert daemon.attempt_pids("warm")[1]["trainer_pid"] == standby["pid"]
    assert _events(daemon, "cold", "attempt_started")[-1]["data"]["standby"] is False
    assert not _events(daemon, "cold", "standby_ready")
    for job in ("warm", "cold"):
        _assert_resumed_from_its_checkpoint(daemon, job)

    final = f"checkpoint-{STEPS}/adapter_model.safetensors"
    warm_bytes = (daemon.work / "warm" / "output" / final).read_bytes()
    assert warm_bytes == (daemon.work / "cold" / "output" / final).read_bytes()
    assert _losses(daemon, "warm") == _losses(daemon, "cold")
    assert not list((daemon.state_dir / "runs" / "warm").glob("standby-*"))


def test_standby_is_replaced_when_lost_dies_with_its_daemon_and_goes_with_the_job(
    daemon: Harness,
) -> None:
    # The run must outlive three standbys' warm-ups and a daemon restart; slow steps
    # make it last, and leave the CPU to the standbys (it is stopped at the end).
    _one_thread(daemon, **{ENV_FAULT_STEP_DELAY: "0.25"})
    daemon.cli("start", str(_demo_job(daemon, "life")))
    first = _ready_standby(daemon, "life")
    assert f"ready (pid {first['pid']}, warm in" in daemon.cli("status", "life").stdout
    os.kill(first["pid"], signal.SIGKILL)
    second = _ready_standby(daemon, "life", not_pid=first["pid"])
    lost = _events(daemon, "life", "standby_lost")
    assert lost and "exit code -9" in lost[0]["message"]

    folder = next((daemon.state_dir / "runs" / "life").glob("standby-*"))
    trainer = daemon.attempt_pids("life")[0]
    daemon.kill_daemon()
    wait_for(lambda: not folder.exists(), 20, what="the orphaned standby to remove itself")
    assert not is_same_process(second["pid"], None)
    assert is_same_process(trainer["trainer_pid"], trainer["trainer_start"]), "run must go on"

    daemon.start_daemon()
    third = _ready_standby(daemon, "life", not_pid=second["pid"])
    stopped = daemon.cli_json("stop", "life", "--now", "--wait")
    assert stopped["state"] == "stopped"
    wait_for(lambda: not group_members(third["pid"]), 20, what="the standby to be gone")
    assert not list((daemon.state_dir / "runs" / "life").glob("standby-*"))
    assert daemon.status("life")["standby"] is None


def test_with_two_standbys_a_second_kill_before_any_warm_up_is_taken_over_too(
    daemon: Harness,
) -> None:
    # Slow steps leave the CPU to the standbys and keep the run going through both kills.
    _one_thread(daemon, **{ENV_FAULT_STEP_DELAY: "0.1"})
    job = _demo_job(daemon, "pair")
    job.write_text(job.read_text().replace("[restart]\n", "[restart]\nstandby_count = 2\n"))
    daemon.cli("start", str(job))

    def two_ready() -> list[int] | None:
        pids = [e["data"]["trainer_pid"] for e in _events(daemon, "pair", "standby_ready")]
        return pids if len(pids) == 2 else None

    warm = wait_for(two_ready, 120, 0.2, "two ready standbys")
    assert daemon.status("pair")["standby"]["ready"] == 2
    _kill_trainer(daemon, "pair")
    wait_for(lambda: len(daemon.attempt_pids("pair")) == 2, 60, what="the first takeover")
    # Killed again at once: no third standby can be warm yet, the second one takes over.
    _kill_trainer(daemon, "pair")
    wait_for(lambda: len(daemon.attempt_pids("pair")) == 3, 60, what="the second takeover")
    wait_for(lambda: daemon.status("pair")["state"] == "running", 60, what="the third attempt")

    started = _events(daemon, "pair", "attempt_started")
    assert [e["data"]["standby"] for e in started] == [False, True, True]
    assert sorted(p["trainer_pid"] for p in daemon.attempt_pids("pair")[1:]) == sorted(warm)
    stopped = daemon.cli_json("stop", "pair", "--now", "--wait")
    assert stopped["state"] == "stopped"
    folders = daemon.state_dir / "runs" / "pair"
    wait_for(lambda: not list(folders.glob("standby-*")), 20, what="the third standby to go")


def _ready_spare(harness: Harness, *, not_pid: int | None = None) -> int:
    """The pid of the daemon's spare once it is ready (and is not `not_pid`)."""

    def ready() -> int | None:
        spare = harness.cli_json("status")["spares"]["next"]
        if spare and spare["state"] == "ready" and spare["pid"] != not_pid:
            return int(spare["pid"])
        return None

    return int(wait_for(ready, 120, 0.2, "a ready spare"))


def test_the_daemons_spare_runs_a_first_attempt_and_a_restart_no_standby_is_ready_for(
    harness: Harness,
) -> None:
    harness.spares = 1
    harness.env.update({"OMP_NUM_THREADS": "1", ENV_FAULT_STEP_DELAY: "0.1"})
    harness.start_daemon()
    spare = _ready_spare(harness)  # before any job: warmed while the daemon was idle
    job = _demo_job(harness, "early")
    harness.cli("start", str(job))
    # "running" comes before the shim's pids.json, and the move to the job's folder after.
    first = wait_for(lambda: harness.attempt_pids("early"), 60, what="the first attempt")[0]
    assert first["trainer_pid"] == spare, "the first attempt did not run in the spare"
    # It runs in the job's folder, where a cold start would (the spare began in the state's).
    in_job_folder = lambda: os.readlink(f"/proc/{spare}/cwd") == str(job.parent)  # noqa: E731
    wait_for(in_job_folder, 30, what="the spare to move into the job's folder")
    started = _events(harness, "early", "attempt_started")[0]
    assert started["data"]["spare"] and "(the daemon's spare)" in started["message"]

    # The job's own standbys keep dying: after three losses it keeps none, and the next
    # restart can only be warm through the spare started after the first step.
    for losses in (1, 2, 3):
        own = _ready_standby(harness, "early")
        os.kill(own["pid"], signal.SIGKILL)
        wait_for(lambda n=losses: len(_events(harness, "early", "standby_lost")) == n, 30)
    second_spare = _ready_spare(harness, not_pid=spare)
    wait_for((job.parent / "output" / "checkpoint-50").is_dir, 120, what="a checkpoint")
    _kill_trainer(harness, "early")
    wait_for(lambda: len(harness.attempt_pids("early")) == 2, 60, what="the restart")
    assert harness.attempt_pids("early")[1]["trainer_pid"] == second_spare
    assert _events(harness, "early", "attempt_started")[1]["data"]["spare"]
    wait_for(lambda: _attempt_stepped(harness, "early", 2), 60, what="the resumed attempt's step")
    _assert_resumed_from_its_checkpoint(harness, "early")
    assert harness.cli_json("stop", "early", "--now", "--wait")["state"] == "stopped"

    third_spare = _ready_spare(harness, not_pid=second_spare)
    harness.kill_daemon()  # an unused spare dies with its daemon and leaves nothing
    wait_for(lambda: not group_members(third_spare), 20, what="the spare to go")
    wait_for(lambda: not list((harness.state_dir / "spares").iterdir()), 20, what="its folder")
