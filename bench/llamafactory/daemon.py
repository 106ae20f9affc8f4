"""A real ftsup daemon in private folders, driven through the real CLI.

The benchmark must not touch the user's own daemon, so it gets its own
FTSUP_STATE_DIR / FTSUP_RUNTIME_DIR (as tests/supervisor_harness.py does).
Everything it started (the daemon, every shim and trainer) is killed at the
end by process group, also when the benchmark failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ftsup.supervisor.client import Client
from ftsup.supervisor.contract import LOG_FILE, PIDS_FILE
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.procinfo import is_same_process

T = TypeVar("T")
AT_REST = ("stopped", "finished", "failed", "gave_up")
ENDED = ("finished", "failed", "gave_up")


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class PrivateDaemon:
    def __init__(self, root: Path) -> None:
        # Short paths: a Unix socket path must fit in 108 bytes.
        self.state_dir = root / "state"
        self.runtime_dir = root / "rt"
        self.layout = Layout(state_dir=self.state_dir, runtime_dir=self.runtime_dir)
        self.env = {
            **os.environ,
            "FTSUP_STATE_DIR": str(self.state_dir),
            "FTSUP_RUNTIME_DIR": str(self.runtime_dir),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Client | None = None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = (self.state_dir / "daemon-bench.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ftsup.supervisor", "daemon"],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for(lambda: self.cli("ls", check=False).returncode == 0, 30, "the daemon")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ftsup ARGS` as a user types it."""
        result = subprocess.run(
            [sys.executable, "-m", "ftsup.supervisor", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"ftsup {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def status(self, job: str) -> dict[str, Any]:
        """`ftsup status JOB --json`, over one kept connection (polled often)."""
        if self._client is None:
            self._client = Client(self.layout.socket)
        return dict(self._client.request("status", job=job))

    def wait_state(self, job: str, *states: str, timeout: float = 300) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(job)
            return status if status["state"] in states else None

        return wait_for(reached, timeout, f"{job} to be {'/'.join(states)}")

    def progress_lines(self, job: str) -> list[dict[str, Any]]:
        """The job's progress.jsonl (written by the instrumentation, if any)."""
        path = self.layout.progress_file(job)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def attempt_log(self, job: str, n: int) -> str:
        path = self.layout.attempt_dir(job, n) / LOG_FILE
        return path.read_text(errors="replace") if path.exists() else ""

    def daemon_log(self) -> str:
        path = self.state_dir / "daemon-bench.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        """Kill the daemon and every shim and trainer it started (by process group)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        for pids_file in self.state_dir.glob(f"runs/*/attempt-*/{PIDS_FILE}"):
            pids = json.loads(pids_file.read_text())
            if is_same_process(pids["shim_pid"], pids["shim_start"]):
                os.kill(pids["shim_pid"], signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pids["pgid"], signal.SIGKILL)
