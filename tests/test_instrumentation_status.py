"""What the daemon knows of a command job's instrumentation, and what it refuses
because of it (real daemon, real toy trainer that never imports transformers)."""

from __future__ import annotations

from ftsup.supervisor.daemon.launcher import bootstrap_dir
from ftsup.supervisor.procinfo import environment
from tests.supervisor_harness import Harness, wait_for


def trainer_pid(daemon: Harness, job: str) -> int:
    """The running trainer's pid. `running` comes a moment before the daemon has
    recorded it (the shim's pids.json): wait for it."""

    def pid() -> int | None:
        current = daemon.status(job)["current_attempt"] or {}
        return current.get("trainer_pid")

    return int(wait_for(pid, 30, 0.05, f"the daemon to know {job}'s trainer pid"))


def trainer_environ(daemon: Harness, job: str) -> dict[str, str]:
    return environment(trainer_pid(daemon, job))


def start_long_job(daemon: Harness, name: str, *, instrument: bool | None) -> None:
    job = daemon.toy_job(name, "--max-steps", "100000", "--step-time", "0.05")
    if instrument is not None:
        text = job.read_text().replace(
            "[command]\n", f"[command]\ninstrument = {str(instrument).lower()}\n"
        )
        job.write_text(text)
    daemon.cli("start", str(job))
    wait_for(lambda: daemon.status(name)["progress"]["step"] >= 2, what=f"{name} to train")


def test_a_command_that_builds_no_trainer_is_waiting_and_save_is_refused(daemon: Harness) -> None:
    start_long_job(daemon, "plain", instrument=None)  # instrument defaults to on
    env = trainer_environ(daemon, "plain")
    assert env["PYTHONPATH"].split(":")[0] == str(bootstrap_dir())
    status = daemon.status("plain")
    assert status["instrumentation"]["state"] == "waiting"
    refused = daemon.cli("save", "plain", check=False)
    assert refused.returncode != 0
    assert "not instrumented" in refused.stderr and "ftsup signal" in refused.stderr
    # SIGUSR2 was not sent: the trainer (which does not handle it) trains on.
    before = daemon.status("plain")["progress"]["step"]
    wait_for(lambda: daemon.status("plain")["progress"]["step"] > before + 2, what="more steps")
    assert (
        daemon.status("plain")["current_attempt"]["trainer_pid"]
        == status["current_attempt"]["trainer_pid"]
    )
    daemon.cli("stop", "plain")
    daemon.wait_state("plain", "stopped")


def test_instrument_false_runs_the_command_as_given(daemon: Harness) -> None:
    start_long_job(daemon, "asis", instrument=False)
    env = trainer_environ(daemon, "asis")
    assert str(bootstrap_dir()) not in env.get("PYTHONPATH", "")
    status = daemon.status("asis")
    assert status["instrumentation"] == {
        "mode": "off",
        "state": "off",
        "trainer": None,
        "transformers": None,
        "error": None,
        "pid": None,
    }
    assert "instrument = false" in daemon.cli("status", "asis").stdout
    daemon.cli("stop", "asis")
    daemon.wait_state("asis", "stopped")
