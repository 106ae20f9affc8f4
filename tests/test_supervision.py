"""The supervisor keeps a real training process alive (real daemon, shims, signals)."""

from __future__ import annotations

import json
import os
import signal
import time

from ftsup.supervisor.procinfo import group_members, is_same_process
from tests.scripts.toy_trainer import expected_final
from tests.supervisor_harness import Harness, wait_for


def test_crashes_twice_then_finishes_resuming_from_newest_checkpoint(daemon: Harness) -> None:
    job = daemon.toy_job(
        "crashy", "--max-steps", "30", "--save-steps", "5", "--crash-at", "12", "--crash-at", "23"
    )
    daemon.cli("start", str(job))
    status = daemon.wait_state("crashy", "finished", "gave_up", "failed")
    assert status["state"] == "finished", status
    assert status["attempts"] == 3 and status["restarts"] == 2
    history = status["attempt_history"]
    assert [a["resume_from"] and os.path.basename(a["resume_from"]) for a in history] == [
        None,
        "checkpoint-10",
        "checkpoint-20",
    ]
    # Each restart re-runs only the steps after the newest checkpoint, exactly once.
    assert daemon.steps("crashy") == [*range(1, 13), *range(11, 24), *range(21, 31)]
    final = json.loads((daemon.work / "crashy" / "final.json").read_text())
    assert final == {"step": 30, "value": expected_final(30)}
    assert status["progress"]["step"] == 30


def test_daemon_sigkill_leaves_the_run_training_and_readopts_it(daemon: Harness) -> None:
    # Long enough never to end during the test: the test ends it with a graceful stop.
    job = daemon.toy_job("survivor", "--max-steps", "100000", "--step-time", "0.05")
    daemon.cli("start", str(job))
    wait_for(lambda: daemon.status("survivor")["progress"]["step"] >= 5, what="step 5")
    trainer_pid = daemon.status("survivor")["current_attempt"]["trainer_pid"]
    pids = daemon.attempt_pids("survivor")[0]
    daemon.kill_daemon()
    at_kill = daemon.steps("survivor")[-1]
    # The trainer goes on without its daemon: it keeps taking steps.
    wait_for(lambda: daemon.steps("survivor")[-1] >= at_kill + 3, what="steps without a daemon")
    assert is_same_process(pids["trainer_pid"], pids["trainer_start"]), "trainer died with daemon"
    daemon.start_daemon()
    status = daemon.status("survivor")
    assert status["state"] == "running"
    assert status["current_attempt"]["trainer_pid"] == trainer_pid
    # Supervision goes on: new steps reach the new daemon, and its stop is obeyed.
    adopted_at = status["progress"]["step"]
    wait_for(
        lambda: daemon.status("survivor")["progress"]["step"] > adopted_at,
        60,
        what="progress reported to the new daemon",
    )
    stopped = daemon.cli_json("stop", "survivor", "--wait")
    assert stopped["state"] == "stopped" and stopped["attempts"] == 1
    assert stopped["last_exit"]["returncode"] == 75  # saved, then exited: a graceful stop
    events = [e["kind"] for e in daemon.cli_json("events", "survivor")["events"]]
    assert "adopted" in events
    steps = daemon.steps("survivor")
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > adopted_at


def test_run_that_ends_while_the_daemon_is_down_is_recorded(daemon: Harness) -> None:
    job = daemon.toy_job("quiet", "--max-steps", "15", "--step-time", "0.05")
    daemon.cli("start", str(job))
    wait_for(lambda: daemon.status("quiet")["progress"]["step"] >= 2, what="step 2")
    daemon.kill_daemon()
    wait_for(lambda: (daemon.work / "quiet" / "final.json").exists(), what="the trainer to end")
    exit_file = daemon.state_dir / "runs" / "quiet" / "attempt-1" / "exit.json"
    wait_for(exit_file.exists, what="exit.json")
    daemon.start_daemon()
    status = daemon.wait_state("quiet", "finished", "gave_up", "failed", timeout=20)
    assert status["state"] == "finished"
    assert status["last_exit"]["returncode"] == 0


def test_crash_loop_gives_up_with_reason_and_log_tail(daemon: Harness) -> None:
    job = daemon.toy_job(
        "loopy", "--max-steps", "30", "--crash-always-at", "3", restart="crash_loop = 3"
    )
    daemon.cli("start", str(job))
    status = daemon.wait_state("loopy", "gave_up", "finished", "failed")
    assert status["state"] == "gave_up"
    assert "crash loop: 3 failures in a row without step progress" in status["reason"]
    assert any("toy crash at step 3" in line for line in status["log_tail"])
    # The first attempt made progress (0 -> 3); the next three did not (resumed at 0, died at 3
    # with no checkpoint): it gives up after attempt 4, not later.
    assert status["attempts"] == 4
    human = daemon.cli("status", "loopy").stdout
    assert "crash loop" in human and "toy crash at step 3" in human


def test_exit_code_2_is_never_retried(daemon: Harness) -> None:
    job = daemon.toy_job("badcfg", "--fail-at-start", "2")
    daemon.cli("start", str(job))
    status = daemon.wait_state("badcfg", "failed", "gave_up", "finished")
    assert status["state"] == "failed"
    assert status["attempts"] == 1
    assert "configuration error" in status["reason"]


def test_exit_75_without_a_stop_request_resumes_at_once(daemon: Harness) -> None:
    """A trainer preempted by someone else's SIGTERM saves, exits 75 and is resumed."""
    job = daemon.toy_job("preempted", "--max-steps", "40", "--step-time", "0.05")
    daemon.cli("start", str(job))
    wait_for(lambda: daemon.status("preempted")["progress"]["step"] >= 7, what="step 7")
    pgid = daemon.attempt_pids("preempted")[0]["pgid"]
    os.killpg(pgid, signal.SIGTERM)  # not through ftsup: like a cluster's preemption notice
    status = daemon.wait_state("preempted", "finished", "gave_up", "failed")
    assert status["state"] == "finished" and status["attempts"] == 2
    assert status["restarts"] == 0  # a clean save-and-stop is not a failure
    steps = daemon.steps("preempted")
    assert sorted(set(steps)) == list(range(1, 41)) and len(steps) == 40  # nothing repeated


def test_second_start_on_the_same_output_dir_is_refused(daemon: Harness) -> None:
    first = daemon.toy_job("first", "--max-steps", "200", "--step-time", "0.05", output="shared")
    second = daemon.toy_job("second", "--max-steps", "10", output="shared")
    daemon.cli("start", str(first))
    refused = daemon.cli("start", str(second), check=False)
    assert refused.returncode == 5
    assert "in use by job 'first'" in refused.stderr
    again = daemon.cli("start", str(first), check=False)
    assert again.returncode == 5 and "already" in again.stderr
    assert daemon.cli_json("ls")["jobs"][0]["name"] == "first"
    assert len(daemon.cli_json("ls")["jobs"]) == 1


def test_output_dir_locked_by_a_foreign_trainer_is_refused(daemon: Harness) -> None:
    """Even a trainer outside this daemon's jobs holds the lock (e.g. a second daemon)."""
    from ftsup.supervisor import outlock

    fd = outlock.acquire(daemon.work / "busy", {"job": "elsewhere", "pid": 1})
    try:
        job = daemon.toy_job("intruder", output="busy")
        refused = daemon.cli("start", str(job), check=False)
        assert refused.returncode == 5 and "elsewhere" in refused.stderr
    finally:
        os.close(fd)


def test_stop_is_graceful_first_and_leaves_no_orphans(daemon: Harness) -> None:
    job = daemon.toy_job("stoppable", "--max-steps", "500", "--step-time", "0.05", "--spawn-child")
    daemon.cli("start", str(job))
    wait_for(lambda: daemon.status("stoppable")["progress"]["step"] >= 5, what="step 5")
    pgid = daemon.attempt_pids("stoppable")[0]["pgid"]
    assert len(group_members(pgid)) == 2  # trainer + its child
    status = daemon.cli_json("stop", "stoppable", "--wait")
    assert status["state"] == "stopped"
    assert status["last_exit"]["returncode"] == 75  # it saved before exiting
    stopped_at = daemon.steps("stoppable")[-1]
    assert (daemon.work / "stoppable" / f"checkpoint-{stopped_at}").is_dir()
    wait_for(lambda: not group_members(pgid), 5, what="the process group to be gone")


def test_stop_escalates_to_sigkill_after_the_grace_period(daemon: Harness) -> None:
    job = daemon.toy_job(
        "stubborn",
        "--max-steps",
        "500",
        "--step-time",
        "0.05",
        "--ignore-term",
        "--spawn-child",
        restart='stop_grace = "1s"',
    )
    daemon.cli("start", str(job))
    wait_for(lambda: daemon.status("stubborn")["progress"]["step"] >= 3, what="step 3")
    pgid = daemon.attempt_pids("stubborn")[0]["pgid"]
    began = time.monotonic()
    status = daemon.cli_json("stop", "stubborn", "--wait")
    assert status["state"] == "stopped"
    assert status["last_exit"]["signal"] == signal.SIGKILL
    assert time.monotonic() - began >= 0.9
    assert not group_members(pgid)


def test_stop_now_kills_at_once(daemon: Harness) -> None:
    job = daemon.toy_job(
        "urgent",
        "--max-steps",
        "500",
        "--step-time",
        "0.05",
        "--ignore-term",
        restart='stop_grace = "1h"',
    )
    daemon.cli("start", str(job))
    wait_for(lambda: daemon.status("urgent")["progress"]["step"] >= 2, what="step 2")
    # With an hour of grace, a `--wait` that returns at all did not wait for it.
    status = daemon.cli_json("stop", "urgent", "--now", "--wait")
    assert status["state"] == "stopped"
    assert status["last_exit"]["signal"] == signal.SIGKILL


def test_restart_resumes_from_the_checkpoint_saved_on_stop(daemon: Harness) -> None:
    job = daemon.toy_job("again", "--max-steps", "60", "--step-time", "0.05")
    daemon.cli("start", str(job))
    wait_for(lambda: daemon.status("again")["progress"]["step"] >= 6, what="step 6")
    daemon.cli("restart", "again")
    status = daemon.wait_state("again", "finished", "gave_up", "failed")
    assert status["state"] == "finished"
    # A manual restart starts a fresh restart budget: the status counts from it.
    assert status["attempts"] == 1 and status["attempt_history"][0]["resume_from"]
    kinds = [e["kind"] for e in daemon.cli_json("events", "again")["events"]]
    assert kinds.count("attempt_started") == 2
    steps = daemon.steps("again")
    assert len(steps) == 60 and sorted(steps) == list(range(1, 61))


def test_command_without_progress_file_is_followed_through_trainer_state(daemon: Harness) -> None:
    job = daemon.toy_job(
        "plainhf", "--max-steps", "20", "--save-steps", "5", "--no-progress", "--step-time", "0.05"
    )
    daemon.cli("start", str(job))
    status = daemon.wait_state("plainhf", "finished", "gave_up", "failed")
    assert status["state"] == "finished"
    assert status["progress"]["step"] == 20
    assert status["progress"]["max_steps"] == 20
    assert status["progress"]["loss"] == 0.5


def test_logs_and_events_cli(daemon: Harness) -> None:
    job = daemon.toy_job("chatty", "--max-steps", "8", "--crash-at", "4")
    daemon.cli("start", str(job))
    daemon.wait_state("chatty", "finished", "gave_up", "failed")
    logs = daemon.cli_json("logs", "chatty", "--attempt", "1")
    assert logs["attempt"] == 1
    assert any("toy crash at step 4" in line for line in logs["lines"])
    assert "training finished" in daemon.cli("logs", "chatty").stdout
    kinds = [e["kind"] for e in daemon.cli_json("events", "chatty")["events"]]
    assert kinds.count("attempt_started") == 2 and kinds[-1] == "finished"
    assert "restart" in kinds


def test_start_spawns_a_daemon_when_none_answers(harness: Harness) -> None:
    job = harness.toy_job("auto", "--max-steps", "3")
    result = harness.cli("start", str(job))
    assert "started the ftsup daemon" in result.stderr
    status = harness.wait_state("auto", "finished", "gave_up", "failed")
    assert status["state"] == "finished"
    harness.cli("shutdown")


def test_cli_without_daemon_says_so(harness: Harness) -> None:
    result = harness.cli("status", check=False)
    assert result.returncode == 3
    assert "no daemon answers" in result.stderr
    assert harness.cli("status", "--json", check=False).returncode == 3


def test_invalid_job_file_starts_nothing(harness: Harness) -> None:
    bad = harness.work / "bad.toml"
    bad.write_text(
        '[job]\nname = "x"\noutput_dir = "out"\n[command]\nargv = []\n[restart]\nbackof = "1s"\n'
    )
    result = harness.cli("start", str(bad), check=False)
    assert result.returncode == 2
    assert "bad.toml:7: [restart] backof: unknown key" in result.stderr
    assert "argv" in result.stderr
    assert not harness.state_dir.exists()  # no daemon was started, nothing was written
    assert not (harness.work / "out").exists()


def test_half_written_newest_checkpoint_is_quarantined_and_never_resumed(daemon: Harness) -> None:
    job = daemon.toy_job("careful", "--max-steps", "30", "--save-steps", "5", "--crash-at", "17")
    out = daemon.work / "careful"
    # A save that was killed midway: the folder exists, trainer_state.json parses, the
    # optimizer file is cut short (its zip central directory is missing).
    daemon.cli("start", str(job))
    wait_for(lambda: (out / ".crashed-at-17").exists(), what="the crash at 17")
    status = daemon.wait_state("careful", "finished", "gave_up", "failed")
    assert status["state"] == "finished"
    # Now damage checkpoint-30 and checkpoint-25 and resubmit: resume must fall back to 20.
    for step in (25, 30):
        optimizer = out / f"checkpoint-{step}" / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:40])
    (out / "final.json").unlink()
    daemon.cli("start", str(job))
    status = daemon.wait_state("careful", "finished", "gave_up", "failed")
    assert status["state"] == "finished"
    assert os.path.basename(status["attempt_history"][0]["resume_from"]) == "checkpoint-20"
    quarantined = sorted(p.name for p in out.iterdir() if ".invalid-" in p.name)
    assert [name.split(".invalid-")[0] for name in quarantined] == [
        "checkpoint-25",
        "checkpoint-30",
    ]
    events = daemon.cli_json("events", "careful")["events"]
    assert any(e["kind"] == "quarantine" and "optimizer.pt" in e["message"] for e in events)


def test_command_that_cannot_start_gives_up_at_once(daemon: Harness) -> None:
    job = daemon.work / "missing.toml"
    job.write_text(
        f'[job]\nname = "missing"\noutput_dir = "{daemon.work / "m"}"\n'
        '[command]\nargv = ["/nonexistent/trainer"]\n'
    )
    daemon.cli("start", str(job))
    status = daemon.wait_state("missing", "gave_up", "failed", "finished")
    assert status["state"] in ("gave_up", "failed") and status["attempts"] == 1
    assert "/nonexistent/trainer" in status["reason"]


def test_hung_trainer_is_detected_stacks_captured_killed_and_restarted(
    daemon: Harness,
) -> None:
    job = daemon.toy_job(
        "hangs",
        "--max-steps",
        "20",
        "--step-time",
        "0.05",
        "--hang-at",
        "7",
        restart='stop_grace = "1s"',
        extra='\n[health]\nhang_timeout = "2s"\nstartup_timeout = "30s"\n',
    )
    daemon.cli("start", str(job))
    status = daemon.wait_state("hangs", "finished", "gave_up", "failed", timeout=60)
    assert status["state"] == "finished"
    first = status["attempt_history"][0]
    assert first["failure_kind"] == "hang" and first["signal"] == signal.SIGKILL
    events = daemon.cli_json("events", "hangs")["events"]
    hung = [e for e in events if e["kind"] == "hung"]
    assert len(hung) == 1 and "no progress for" in hung[0]["message"]
    stacks = [e for e in events if e["kind"] == "stacks"]
    assert stacks, events
    # py-spy where installed; else the trainer's faulthandler writes them into its log.
    attempt_dir = daemon.state_dir / "runs" / "hangs" / "attempt-1"
    captured = (attempt_dir / "stacks.txt").read_text() + (attempt_dir / "stdout.log").read_text()
    assert "toy_trainer.py" in captured and "main" in captured, captured


def test_stopped_process_sigstop_is_a_hang(daemon: Harness) -> None:
    job = daemon.toy_job(
        "frozen",
        "--max-steps",
        "30",
        "--step-time",
        "0.05",
        restart='stop_grace = "1s"',
        extra='\n[health]\nhang_timeout = "2s"\n',
    )
    daemon.cli("start", str(job))
    wait_for(lambda: daemon.status("frozen")["progress"]["step"] >= 5, what="step 5")
    os.kill(daemon.attempt_pids("frozen")[0]["trainer_pid"], signal.SIGSTOP)
    status = daemon.wait_state("frozen", "finished", "gave_up", "failed", timeout=60)
    assert status["state"] == "finished"
    assert status["attempt_history"][0]["failure_kind"] == "hang"


def test_slow_but_alive_trainer_is_never_killed(daemon: Harness) -> None:
    """Adaptive timeout: 10 x the median step; long saves are judged by save time."""
    job = daemon.toy_job(
        "slowpoke",
        "--max-steps",
        "12",
        "--step-time",
        "0.4",
        "--save-steps",
        "4",
        "--save-time",
        "2.5",
        extra='\n[health]\nhang_floor = "1s"\n',
    )
    daemon.cli("start", str(job))
    status = daemon.wait_state("slowpoke", "finished", "gave_up", "failed", timeout=60)
    assert status["state"] == "finished" and status["attempts"] == 1
    kinds = [e["kind"] for e in daemon.cli_json("events", "slowpoke")["events"]]
    assert "hung" not in kinds


def test_nan_loss_rolls_back_past_the_bad_data_and_finishes(daemon: Harness) -> None:
    job = daemon.toy_job("nanny", "--max-steps", "20", "--save-steps", "5", "--nan-at", "15")
    daemon.cli("start", str(job))
    status = daemon.wait_state("nanny", "finished", "gave_up", "failed", "stopped")
    assert status["state"] == "finished"
    first, second = status["attempt_history"]
    assert "loss-anomaly" in first["reason"]
    # checkpoint-15 was saved with the NaN step's weights: set aside, resumed from 10.
    assert second["resume_from"].endswith("checkpoint-10")
    out = daemon.work / "nanny"
    assert [p.name.split(".invalid-")[0] for p in out.glob("*.invalid-*")] == ["checkpoint-15"]
    events = daemon.cli_json("events", "nanny")["events"]
    anomaly = [e for e in events if e["kind"] == "loss_anomaly"]
    assert len(anomaly) == 1
    assert "skipping the data of steps 15-15" in anomaly[0]["message"]
    skip_file = daemon.state_dir / "runs" / "nanny" / "skip_steps.json"
    assert json.loads(skip_file.read_text()) == [[15, 15]]
    # The resumed attempt was told which data to skip: its step 15 has a finite loss.
    progress = (daemon.state_dir / "runs" / "nanny" / "progress.jsonl").read_text()
    losses_at_15 = [
        r["loss"]
        for r in map(json.loads, progress.splitlines())
        if r.get("event") == "step" and r["step"] == 15
    ]
    assert len(losses_at_15) == 2
    assert losses_at_15[0] != losses_at_15[0] and losses_at_15[1] == 10.0 / 15  # NaN, then fine


def test_nan_loss_with_policy_stop_stops_without_saving(daemon: Harness) -> None:
    job = daemon.toy_job(
        "strict",
        "--max-steps",
        "20",
        "--save-steps",
        "5",
        "--nan-at",
        "12",
        "--step-time",
        "0.1",
        extra='\n[health]\nloss_anomaly = "stop"\n',
    )
    daemon.cli("start", str(job))
    status = daemon.wait_state("strict", "stopped", "finished", "gave_up", "failed")
    assert status["state"] == "stopped"
    assert "loss anomaly" in status["reason"] and "step 12" in status["reason"]
    assert not (daemon.work / "strict" / "checkpoint-12").exists()


def test_nan_loss_with_policy_warn_only_warns(daemon: Harness) -> None:
    job = daemon.toy_job(
        "relaxed",
        "--max-steps",
        "15",
        "--nan-at",
        "12",
        extra='\n[health]\nloss_anomaly = "warn"\n',
    )
    daemon.cli("start", str(job))
    status = daemon.wait_state("relaxed", "finished", "gave_up", "failed", "stopped")
    assert status["state"] == "finished" and status["attempts"] == 1
    kinds = [e["kind"] for e in daemon.cli_json("events", "relaxed")["events"]]
    assert kinds.count("loss_anomaly") == 1
