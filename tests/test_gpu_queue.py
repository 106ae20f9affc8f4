"""The GPU queue under a real daemon (issue 15): exclusive GPUs, `queued` with the
reason, `after` chains, blocked successors, allocations that outlive the daemon.
Trainers are the toy trainer; GPUs are named by index (no monitor needed)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ftsup.supervisor.contract import ENV_SIMULATE_GPUS
from tests.supervisor_harness import Harness, wait_for
from tests.test_instrumentation_status import trainer_environ, trainer_pid


def queued_job(
    harness: Harness,
    name: str,
    *toy_args: str,
    job_keys: str = "",
    gpu: str = "",
    restart: str = "",
) -> Path:
    path = harness.toy_job(
        name, *toy_args, restart=restart, extra=f"\n[gpu]\n{gpu}\n" if gpu else ""
    )
    text = path.read_text().replace("[job]\n", f"[job]\n{job_keys}\n", 1)
    path.write_text(text)
    return path


LONG = ("--max-steps", "100000", "--step-time", "0.05")


def with_gpus(harness: Harness, count: int) -> Harness:
    """A daemon that sees `count` simulated GPUs (FTSUP_SIMULATE_GPUS)."""
    harness.env[ENV_SIMULATE_GPUS] = str(count)
    harness.start_daemon()
    return harness


def running_on(daemon: Harness, job: str) -> list[int]:
    status = daemon.wait_state(job, "running")
    devices = trainer_environ(daemon, job)["CUDA_VISIBLE_DEVICES"]
    assert status["gpu_devices"] == [int(i) for i in devices.split(",")]
    return list(status["gpu_devices"])


def test_two_jobs_naming_one_gpu_take_turns(harness: Harness) -> None:
    daemon = with_gpus(harness, 2)
    daemon.cli("start", str(queued_job(daemon, "first", *LONG, gpu="devices = [0]")))
    wait_for(lambda: daemon.status("first")["state"] == "running", what="first to run")
    daemon.cli("start", str(queued_job(daemon, "second", *LONG, gpu="devices = [0]")))
    status = daemon.wait_state("second", "queued")
    assert "first" in status["reason"]  # who holds the GPU it waits for
    queue = daemon.cli_json("queue")
    assert queue["holding"] == [{"job": "first", "gpus": [0]}]
    assert [w["job"] for w in queue["waiting"]] == ["second"]
    assert "first" in daemon.cli("queue").stdout
    assert trainer_environ(daemon, "first")["CUDA_VISIBLE_DEVICES"] == "0"
    daemon.cli("stop", "first")
    daemon.wait_state("first", "stopped")
    daemon.wait_state("second", "running")
    assert trainer_environ(daemon, "second")["CUDA_VISIBLE_DEVICES"] == "0"
    kinds = [e["kind"] for e in daemon.cli_json("events", "second")["events"]]
    assert kinds.index("queued") < kinds.index("placed") < kinds.index("attempt_started")
    daemon.cli("stop", "second")
    daemon.wait_state("second", "stopped")


def test_after_chains_run_in_order_and_a_failed_predecessor_blocks(daemon: Harness) -> None:
    short = ("--max-steps", "3", "--step-time", "0.01")
    daemon.cli("start", str(queued_job(daemon, "c", *short, job_keys='after = ["b"]')))
    # A predecessor nobody submitted: blocked until someone does.
    assert "no such job" in daemon.wait_state("c", "blocked")["reason"]
    daemon.cli("start", str(queued_job(daemon, "b", *short, job_keys='after = ["a"]')))
    wait_for(
        lambda: "after b, which is blocked" in (daemon.status("c")["reason"] or ""),
        what="c to wait for b, itself blocked",
    )
    daemon.cli("start", str(queued_job(daemon, "a", *short)))
    for name in ("a", "b", "c"):
        daemon.wait_state(name, "finished")
    started = {
        name: daemon.status(name)["attempt_history"][0]["started_at"] for name in ("a", "b", "c")
    }
    finished = {name: daemon.status(name)["updated_at"] for name in ("a", "b")}
    assert finished["a"] <= started["b"] and finished["b"] <= started["c"]

    crash = ("--max-steps", "50", "--crash-at", "2")
    daemon.cli("start", str(queued_job(daemon, "doomed", *crash, restart="max_restarts = 0")))
    daemon.cli("start", str(queued_job(daemon, "next", *short, job_keys='after = ["doomed"]')))
    daemon.wait_state("doomed", "gave_up", "failed")
    status = daemon.wait_state("next", "blocked")
    assert "doomed" in status["reason"]
    assert status["attempts"] == 0


def test_a_new_daemon_keeps_who_holds_what(harness: Harness) -> None:
    daemon = with_gpus(harness, 2)
    daemon.cli("start", str(queued_job(daemon, "holder", *LONG, gpu="devices = [1]")))
    wait_for(lambda: daemon.status("holder")["state"] == "running", what="holder to run")
    daemon.cli("start", str(queued_job(daemon, "waiter", *LONG, gpu="devices = [1]")))
    daemon.wait_state("waiter", "queued")
    pid = trainer_pid(daemon, "holder")
    daemon.kill_daemon()
    daemon.start_daemon()
    assert daemon.wait_state("waiter", "queued")["reason"]
    holder = daemon.wait_state("holder", "running")
    assert holder["current_attempt"]["trainer_pid"] == pid  # re-adopted, not restarted
    assert daemon.cli_json("queue")["holding"] == [{"job": "holder", "gpus": [1]}]
    daemon.cli("stop", "holder")
    daemon.wait_state("waiter", "running")
    daemon.cli("stop", "waiter")
    daemon.wait_state("waiter", "stopped")


def test_job_files_ask_for_gpus_one_way_and_never_wait_for_themselves(tmp_path: Path) -> None:
    import pytest

    from ftsup.supervisor.spec import SpecError, parse_spec

    base = '[job]\nname = "a"\noutput_dir = "out"\n{job}\n[command]\nargv = ["true"]\n{gpu}'
    ok = parse_spec(
        base.format(job='priority = 5\nafter = ["b"]\npreemptible = true', gpu="[gpu]\ncount = 2"),
        tmp_path / "a.toml",
    )
    assert (ok.job.priority, ok.job.after, ok.job.preemptible) == (5, ("b",), True)
    assert (ok.gpu.count, ok.gpu.devices) == (2, None)
    with pytest.raises(SpecError) as both:
        parse_spec(base.format(job="", gpu="[gpu]\ncount = 2\ndevices = [0]"), tmp_path / "a.toml")
    assert "count and devices cannot both be set" in str(both.value)
    with pytest.raises(SpecError) as itself:
        parse_spec(base.format(job='after = ["a"]', gpu=""), tmp_path / "a.toml")
    assert "cannot wait for itself" in str(itself.value)
    with pytest.raises(SpecError) as high:
        parse_spec(base.format(job="priority = 5000", gpu=""), tmp_path / "a.toml")
    assert "at most 1,000" in str(high.value)


def test_three_jobs_of_two_gpus_on_four_share_them_in_turn(harness: Harness) -> None:
    daemon = with_gpus(harness, 4)
    for name in ("one", "two"):
        daemon.cli("start", str(queued_job(daemon, name, *LONG, gpu="count = 2")))
    held = {name: running_on(daemon, name) for name in ("one", "two")}
    assert sorted(held["one"] + held["two"]) == [0, 1, 2, 3]  # disjoint, all four used
    daemon.cli("start", str(queued_job(daemon, "three", *LONG, gpu="count = 2")))
    reason = daemon.wait_state("three", "queued")["reason"]
    assert "one" in reason and "two" in reason  # who holds what it needs
    listing = " ".join(daemon.cli("ls").stdout.split())  # `ftsup ls` says it too
    assert f"three: {reason}" in listing
    daemon.cli("stop", "two")
    daemon.wait_state("two", "stopped")
    assert running_on(daemon, "three") == held["two"]  # the freed pair
    for name in ("one", "three"):
        daemon.cli("stop", name)
        daemon.wait_state(name, "stopped")


def test_a_gpu_fault_re_places_a_count_job_and_nobody_gets_the_bad_gpu(harness: Harness) -> None:
    daemon = with_gpus(harness, 4)
    daemon.cli("start", str(queued_job(daemon, "moved", *LONG, gpu="count = 2")))
    first = running_on(daemon, "moved")
    wait_for(lambda: daemon.status("moved")["progress"]["step"] >= 6, what="a checkpoint")
    daemon.cli("gpus", "simulate-xid", str(first[0]), "79")
    wait_for(
        lambda: (
            len(daemon.status("moved")["attempt_history"]) == 2
            and daemon.status("moved")["state"] == "running"
        ),
        what="the job to restart",
    )
    second = running_on(daemon, "moved")
    assert first[0] not in second and len(second) == 2
    history = daemon.status("moved")["attempt_history"]
    assert history[1]["resume_from"]  # from its newest checkpoint, not from scratch
    # The bad GPU stays out: a job that needs it waits until the GPU is reset.
    daemon.cli("start", str(queued_job(daemon, "spare", *LONG, gpu="count = 2")))
    reason = daemon.wait_state("spare", "queued")["reason"]
    assert f"{first[0]} unhealthy" in reason
    daemon.cli("gpus", "reset", str(first[0]))  # the GPU is back: the waiting job gets it
    assert first[0] in running_on(daemon, "spare")
    for name in ("moved", "spare"):
        daemon.cli("stop", name)
        daemon.wait_state(name, "stopped")


def test_a_priority_job_preempts_a_preemptible_one_which_resumes_losing_no_step(
    harness: Harness,
) -> None:
    daemon = with_gpus(harness, 2)
    low = queued_job(daemon, "low", *LONG, job_keys="preemptible = true", gpu="count = 2")
    daemon.cli("start", str(low))
    assert running_on(daemon, "low") == [0, 1]
    wait_for(lambda: daemon.status("low")["progress"]["step"] >= 3, what="low to train")
    high = queued_job(daemon, "high", *LONG, job_keys="priority = 10", gpu="count = 2")
    daemon.cli("start", str(high))
    assert running_on(daemon, "high") == [0, 1]
    low_status = daemon.wait_state("low", "queued")
    assert "high" in low_status["reason"]
    saved = daemon.steps("low")[-1]  # the step it saved at when it was stopped
    assert low_status["attempt_history"][0]["returncode"] == 75
    daemon.cli("stop", "high")
    assert running_on(daemon, "low") == [0, 1]
    wait_for(lambda: daemon.status("low")["progress"]["step"] > saved + 2, what="low to go on")
    history = daemon.status("low")["attempt_history"]
    assert history[1]["resume_from"].endswith(f"checkpoint-{saved}")
    steps = daemon.steps("low")
    assert steps == list(range(1, len(steps) + 1))  # no step run twice: nothing recomputed
    kinds = [e["kind"] for e in daemon.cli_json("events", "low")["events"]]
    assert "preempted" in kinds
    daemon.cli("stop", "low")
    assert daemon.wait_state("low", "stopped")["state"] == "stopped"


def test_start_after_writes_the_dependency_into_the_stored_job(daemon: Harness) -> None:
    short = ("--max-steps", "3", "--step-time", "0.01")
    daemon.cli("start", str(queued_job(daemon, "late", *short)), "--after", "early")
    assert "early" in daemon.wait_state("late", "blocked")["reason"]  # no such job yet
    refused = daemon.cli(
        "start",
        str(queued_job(daemon, "twice", job_keys='after = ["x"]')),
        "--after",
        "y",
        check=False,
    )
    assert refused.returncode != 0 and "already sets after" in refused.stderr
    daemon.kill_daemon()  # the dependency lives in the stored job file, not in memory
    daemon.start_daemon()
    assert "early" in daemon.wait_state("late", "blocked")["reason"]
    daemon.cli("start", str(queued_job(daemon, "early", *short)))
    daemon.wait_state("late", "finished")


def test_a_database_without_allocations_still_knows_who_holds_what(harness: Harness) -> None:
    """Rebuilt from runs/, the database has no allocations: a new daemon reads the GPUs
    of the trainers it re-adopts from their environment before it places anything."""
    daemon = with_gpus(harness, 2)
    daemon.cli("start", str(queued_job(daemon, "kept", *LONG, gpu="count = 1")))
    held = running_on(daemon, "kept")
    daemon.kill_daemon()
    with sqlite3.connect(daemon.state_dir / "ftsup.db") as db:
        db.execute("DELETE FROM allocations")
    db.close()
    daemon.start_daemon()
    daemon.cli("start", str(queued_job(daemon, "pair", *LONG, gpu="count = 2")))
    assert "kept" in daemon.wait_state("pair", "queued")["reason"]  # not placed over it
    assert daemon.cli_json("queue")["holding"] == [{"job": "kept", "gpus": held}]
    for name in ("kept", "pair"):
        daemon.cli("stop", name)
        daemon.wait_state(name, "stopped")
