"""Hostile things in a user's output folder (issue 12, defects 1 and 5, and the
output_dir refusals): a FIFO where ftsup expects a file, a symlink at the lock,
a file, a loop or a read-only mount as the output folder, an alias of another
job's folder. Each must be a clear refusal or finding, and the daemon must keep
answering: the event loop never opens a user-controlled path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ftsup.supervisor import outlock
from ftsup.supervisor.store import Store
from tests.disks import tmpfs
from tests.supervisor_harness import Harness, wait_for

# A command that makes checkpoint-5 with a FIFO as trainer_state.json, says so on
# stdout (the daemon reads its log in the same pump that reads trainer_state),
# then waits for the test's go-ahead and exits 0.
FIFO_TRAINER = textwrap.dedent("""\
    import os, sys, time
    out = sys.argv[1]
    ckpt = os.path.join(out, "checkpoint-5")
    os.makedirs(ckpt, exist_ok=True)
    os.mkfifo(os.path.join(ckpt, "trainer_state.json"))
    print("fifo ready", flush=True)
    while not os.path.exists(os.path.join(out, "go")):
        time.sleep(0.05)
    print("done", flush=True)
""")


def command_job(harness: Harness, name: str, output_dir: Path, argv: list[str]) -> Path:
    text = textwrap.dedent(f"""\
        [job]
        name = "{name}"
        output_dir = "{output_dir}"

        [command]
        argv = {json.dumps(argv)}

        [restart]
        backoff = "0.1s"
        backoff_max = "1s"
        """)
    path = harness.work / f"{name}.toml"
    path.write_text(text)
    return path


def answers(harness: Harness) -> bool:
    """`ftsup ls` answers (exit 0) within a generous bound."""
    try:
        return harness.cli("ls", check=False, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_refused(harness: Harness, job: Path) -> subprocess.CompletedProcess[str]:
    try:
        return harness.cli("start", str(job), check=False, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("`ftsup start` did not answer: the daemon's loop is blocked")


def test_fifo_lock_file_is_refused_and_the_daemon_keeps_answering(daemon: Harness) -> None:
    out = daemon.work / "out"
    out.mkdir()
    os.mkfifo(out / ".ftsup.lock")
    job = daemon.toy_job("fifo", output="out")
    refused = start_refused(daemon, job)
    assert refused.returncode != 0
    assert "FIFO" in refused.stderr and "not a regular file" in refused.stderr
    assert str(out / ".ftsup.lock") in refused.stderr
    assert answers(daemon)
    assert daemon.cli_json("ls")["jobs"] == []


def test_fifo_trainer_state_keeps_the_daemon_answering(daemon: Harness) -> None:
    out = daemon.work / "fifojob"
    job = command_job(daemon, "fifojob", out, [sys.executable, "-c", FIFO_TRAINER, str(out)])
    daemon.cli("start", str(job))
    # The line is printed after the FIFO exists; the pump that reads it has
    # already looked for trainer_state.json (before the log, same pump).
    wait_for(
        lambda: answers(daemon) and "fifo ready" in daemon.cli("logs", "fifojob").stdout,
        60,
        0.2,
        "the log line after the FIFO",
    )
    for _ in range(3):
        assert answers(daemon)
    (out / "go").touch()
    status = daemon.wait_state("fifojob", "finished", "failed", "gave_up")
    assert status["state"] == "finished"
    events = daemon.cli_json("events", "fifojob")["events"]
    verdicts = [e["message"] for e in events if e["kind"] == "checkpoint"]
    assert any("checkpoint-5 invalid" in m and "FIFO, not a regular file" in m for m in verdicts), (
        verdicts
    )


def test_symlink_lock_file_is_never_followed(daemon: Harness) -> None:
    precious = daemon.work / "precious.txt"
    precious.write_text("do not truncate me\n")
    out = daemon.work / "linked"
    out.mkdir()
    (out / ".ftsup.lock").symlink_to(precious)
    job = daemon.toy_job("linked", output="linked")
    refused = start_refused(daemon, job)
    assert refused.returncode != 0 and "symbolic link" in refused.stderr
    # What the shim does at launch, had the refusal been raced: no truncation.
    with pytest.raises(outlock.OutputLocked, match="symbolic link"):
        outlock.acquire(out, {"job": "linked", "pid": os.getpid()})
    assert precious.read_text() == "do not truncate me\n"
    assert (out / ".ftsup.lock").is_symlink()


def test_unusable_output_dirs_are_refused_at_submit(daemon: Harness) -> None:
    a_file = daemon.work / "a-file"
    a_file.write_text("not a folder\n")
    loop = daemon.work / "loop"
    loop.symlink_to(loop)
    cases = {
        "isfile": (a_file, "is a file, not a folder"),
        "looped": (loop, "symlink loop"),
        "under": (a_file / "sub", "not a folder"),
    }
    with tmpfs(daemon.work / "ro", "1m", "ro") as ro:
        cases["readonly"] = (ro / "out", "not writable")
        cases["rotop"] = (ro, "read-only file system")
        for name, (output_dir, words) in cases.items():
            job = command_job(daemon, name, output_dir, [sys.executable, "-c", "pass"])
            refused = start_refused(daemon, job)
            assert refused.returncode == 2, (name, refused.stderr)  # bad input
            assert words in refused.stderr and str(output_dir) in refused.stderr, name
    assert daemon.cli_json("ls")["jobs"] == []


def test_symlink_alias_of_a_live_jobs_output_is_refused(daemon: Harness) -> None:
    first = daemon.toy_job("first", "--max-steps", "400", "--step-time", "0.05", output="real")
    daemon.cli("start", str(first))
    alias = daemon.work / "alias"
    alias.symlink_to(daemon.work / "real")
    second = command_job(daemon, "second", alias, [sys.executable, "-c", "pass"])
    refused = start_refused(daemon, second)
    assert refused.returncode == 5
    assert "in use by job 'first'" in refused.stderr and "stop it first" in refused.stderr


def test_alias_is_refused_while_the_other_job_is_in_backoff(daemon: Harness) -> None:
    crashing = daemon.toy_job(
        "crashy",
        "--crash-always-at",
        "1",
        "--step-time",
        "0.01",
        output="real2",
        restart="crash_loop = 5",
    )
    text = crashing.read_text().replace('backoff = "0.1s"', 'backoff = "1h"')
    crashing.write_text(text.replace('backoff_max = "1s"', 'backoff_max = "1h"'))
    daemon.cli("start", str(crashing))
    daemon.wait_state("crashy", "backoff", timeout=60)
    assert not outlock.is_locked(daemon.work / "real2")  # nobody holds the lock now
    alias = daemon.work / "alias2"
    alias.symlink_to(daemon.work / "real2")
    second = command_job(daemon, "second2", alias, [sys.executable, "-c", "pass"])
    refused = start_refused(daemon, second)
    assert refused.returncode == 5 and "in use by job 'crashy'" in refused.stderr


def test_an_attempt_the_daemon_never_launched_is_not_a_failure(daemon: Harness) -> None:
    """The daemon died after recording attempt 2 and before spawning its shim."""
    job = daemon.toy_job("ghost", "--max-steps", "6", "--step-time", "0.02")
    daemon.cli("start", str(job))
    daemon.wait_state("ghost", "finished")
    daemon.kill_daemon()
    store = Store(daemon.state_dir / "ftsup.db")
    try:
        store.add_attempt(job="ghost", n=2, started_at=1.0, resume_from=None, start_step=6)
        store.set_job_state("ghost", "starting", "launching")
    finally:
        store.close()
    daemon.start_daemon()
    status = daemon.wait_state("ghost", "finished", "failed", "gave_up")
    assert status["state"] == "finished"
    assert status["restarts"] == 0  # the attempt that never ran counted as no failure
    events = daemon.cli_json("events", "ghost")["events"]
    assert any("never started" in e["message"] for e in events)
