"""A real daemon in temporary folders, driven through the real CLI, for tests.

Everything it starts (the daemon, and every shim and trainer the daemon
started) is killed at teardown by process group, even when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftsup.supervisor.memory_tier import shm_folder
from ftsup.supervisor.procinfo import is_same_process

REPO = Path(__file__).resolve().parent.parent
TOY_TRAINER = REPO / "tests" / "scripts" / "toy_trainer.py"


def ftsup_check_json(job: Path) -> dict[str, Any]:
    """`ftsup check JOB --json` as a user runs it; fails the test unless it passes."""
    result = subprocess.run(
        [sys.executable, "-m", "ftsup.supervisor", "check", str(job), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    assert answer["ok"] and answer["warnings"] == [], answer
    return answer


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Harness:
    def __init__(self) -> None:
        # Short paths: a Unix socket path must fit in 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="ftsup-t", dir="/tmp"))
        self.state_dir = self.root / "state"
        self.runtime_dir = self.root / "rt"
        self.work = self.root / "work"
        self.work.mkdir()
        self.daemon: subprocess.Popen[bytes] | None = None
        # The daemon's spare standbys (daemon.toml [standby] spares; 1 in production):
        # off unless a test is about them, so that no test pays a warm-up it does not use.
        self.spares = 0
        self.env = {
            **os.environ,
            "FTSUP_STATE_DIR": str(self.state_dir),
            "FTSUP_RUNTIME_DIR": str(self.runtime_dir),
            "PYTHONUNBUFFERED": "1",
        }

    # daemon ----------------------------------------------------------------
    def start_daemon(self) -> subprocess.Popen[bytes]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config = self.state_dir / "daemon.toml"  # a test's own settings are kept
        text = config.read_text() if config.exists() else ""
        if "[standby]" not in text:
            config.write_text(f"{text}\n[standby]\nspares = {self.spares}\n")
        log = (self.state_dir / "daemon-test.log").open("ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "ftsup.supervisor", "daemon"],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for(lambda: self.cli("ls", check=False).returncode == 0, 20, 0.1, "the daemon")
        return self.daemon

    def kill_daemon(self) -> None:
        """SIGKILL the daemon alone (its shims and trainers are in other sessions)."""
        assert self.daemon is not None
        self.daemon.kill()
        self.daemon.wait(10)
        self.daemon = None

    def daemon_log(self) -> str:
        path = self.state_dir / "daemon-test.log"
        return path.read_text() if path.exists() else ""

    # CLI -------------------------------------------------------------------
    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "ftsup.supervisor", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ftsup {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def cli_json(self, *args: str, check: bool = True) -> Any:
        result = self.cli(*args, "--json", check=check)
        return json.loads(result.stdout)

    def status(self, job: str) -> dict[str, Any]:
        """What `ftsup status JOB --json` prints (the daemon's answer, unchanged),
        asked over the socket from this process: a new CLI process per poll would
        keep a core from the trainers on a 2-core machine."""
        from ftsup.supervisor.client import Client
        from ftsup.supervisor.paths import Layout

        with Client(Layout.from_env(self.state_dir, self.runtime_dir).socket) as client:
            return dict(client.request("status", job=job))

    def progress_lines(self, job: str) -> list[dict[str, Any]]:
        """The job's progress file as its trainer wrote it (complete lines only), read
        directly: on a multi-node job, this node's trainer's lines."""
        path = self.state_dir / "runs" / job / "progress.jsonl"
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def progress_history(self, job: str) -> list[dict[str, Any]]:
        """Every progress record of the job the daemon recorded, all attempts."""
        from ftsup.supervisor.client import Client
        from ftsup.supervisor.paths import Layout

        layout = Layout.from_env(self.state_dir, self.runtime_dir)
        with Client(layout.socket) as client:
            answer = client.request("progress_history", job=job, limit=5000)
        return list(answer["records"])

    def step_losses(self, job: str) -> list[tuple[int, float]]:
        """(step, loss) of every step record with a loss, all attempts included."""
        return [
            (r["step"], r["loss"])
            for r in self.progress_history(job)
            if r.get("event") == "step" and r.get("loss") is not None
        ]

    def wait_state(self, job: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(job)
            return status if status["state"] in states else None

        return dict(wait_for(reached, timeout, 0.1, f"{job} to be {'/'.join(states)}"))

    # jobs ------------------------------------------------------------------
    def toy_job(
        self,
        name: str,
        *trainer_args: str,
        restart: str = "",
        resume: bool = True,
        output: str | None = None,
        extra: str = "",
    ) -> Path:
        output_dir = self.work / (output or name)
        argv = [sys.executable, str(TOY_TRAINER), "--output-dir", str(output_dir), *trainer_args]
        resume_line = 'resume_args = ["--resume_from_checkpoint", "{checkpoint}"]' if resume else ""
        text = (
            textwrap.dedent(f"""\
            [job]
            name = "{name}"
            output_dir = "{output_dir}"

            [command]
            argv = {json.dumps(argv)}
            {resume_line}

            [restart]
            backoff = "0.1s"
            backoff_max = "1s"
            {restart}
            """)
            + extra
        )
        path = self.work / f"{name}.toml"
        path.write_text(text)
        return path

    def steps(self, job: str, output: str | None = None) -> list[int]:
        path = self.work / (output or job) / "steps.log"
        return [int(line.split()[1]) for line in path.read_text().splitlines()]

    def attempt_pids(self, job: str) -> list[dict[str, Any]]:
        runs = self.state_dir / "runs" / job
        found = []
        for pids in sorted(runs.glob("attempt-*/pids.json")):
            found.append(json.loads(pids.read_text()))
        return found

    # teardown --------------------------------------------------------------
    def cleanup(self) -> None:
        self.cleanup_processes()
        # The daemons' memory snapshots, when their runtime folders are not in RAM
        # (this one's and those inside it: `ftsup demo --queue`).
        for runtime in [self.runtime_dir, *self.runtime_dir.glob("*/")]:
            shutil.rmtree(shm_folder(runtime), ignore_errors=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def cleanup_processes(self) -> None:
        """Kill the daemon and every shim and trainer it started (by process group)."""
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.wait(10)
            self.daemon = None
        # `**/`: daemons with a state folder inside this one too (`ftsup demo --queue`)
        standbys = self.state_dir.glob("**/runs/*/standby-*/standby.json")
        for pids_file in [*self.state_dir.glob("**/runs/*/attempt-*/pids.json"), *standbys]:
            pids = json.loads(pids_file.read_text())
            if is_same_process(pids["shim_pid"], pids["shim_start"]):
                os.kill(pids["shim_pid"], signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pids["pgid"], signal.SIGKILL)
        # A daemon started by `ftsup start` (not by this harness) records its pid here.
        for lock in self.state_dir.glob("**/daemon.lock"):
            self._kill_daemon_of(lock)

    def _kill_daemon_of(self, lock: Path) -> None:
        if lock.exists() and lock.read_text().strip().isdigit():
            pid = int(lock.read_text())
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                cmdline = b""
            if b"ftsup.supervisor" in cmdline and str(self.state_dir).encode() in (
                Path(f"/proc/{pid}/environ").read_bytes() + cmdline
            ):
                os.killpg(pid, signal.SIGKILL)


# standby shims ----------------------------------------------------------------
def start_standby_shim(
    standby_dir: Path, output_dir: Path, daemon_pid: int, argv: list[str], job: str = "j"
) -> subprocess.Popen[bytes]:
    """`standby_shim` as the daemon starts it (FIFO made first), in its own session."""
    from ftsup.supervisor.standby_shim import FIFO_NAME, standby_command

    standby_dir.mkdir(parents=True)
    os.mkfifo(standby_dir / FIFO_NAME)
    output_dir.mkdir(parents=True, exist_ok=True)
    shim_argv = standby_command(standby_dir, output_dir, job, 5.0, daemon_pid, argv)
    return subprocess.Popen(shim_argv, start_new_session=True)


def activate_standby(standby_dir: Path, attempt_dir: Path, activation: dict[str, Any]) -> None:
    """What the daemon does: activation.json, rename to the attempt, path to the FIFO."""
    from ftsup.supervisor.atomicio import write_json_atomic
    from ftsup.supervisor.standby_shim import ACTIVATION_FILE, FIFO_NAME

    write_json_atomic(standby_dir / ACTIVATION_FILE, activation)
    standby_dir.rename(attempt_dir)
    (attempt_dir / FIFO_NAME).write_text(f"{attempt_dir}\n")


def run_in_group(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run `argv` to its end in a session of its own: (exit code, output and errors
    together). Its whole process group is killed if it outlives `timeout` (or the
    test is interrupted meanwhile), so no process of it is left behind."""
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, output.decode(errors="replace")
