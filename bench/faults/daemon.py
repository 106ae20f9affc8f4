"""A real ftsup daemon in temporary folders, driven through the real CLI, with the
health check that follows every case (alive, answers `ftsup ls`, no traceback)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.faults.outcomes import CliResult, Outcome
from bench.faults.procs import REAPER, alive, group_alive, kill_groups, newest_pids, wait_until

LIVE_STATES = ("pending", "queued", "starting", "running", "backoff", "stopping")


class Daemon:
    """A real ftsup daemon in its own temporary state and runtime folders."""

    def __init__(
        self,
        root: Path,
        *,
        state: Path | None = None,
        runtime: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.state = state or root / "s"
        self.runtime = runtime or root / "r"
        self.work = root / "w"
        self.work.mkdir(exist_ok=True)
        self.log = root / "daemon.out"  # outside the state folder: readable when it is full
        self.env = {
            **(env or os.environ),
            "FTSUP_STATE_DIR": str(self.state),
            "FTSUP_RUNTIME_DIR": str(self.runtime),
            "PYTHONUNBUFFERED": "1",
        }
        REAPER.state_dirs.append(self.state)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_seen = 0

    def start(self, *, nofile: int | None = None, wait: float = 30.0) -> bool:
        """Start the daemon (optionally under RLIMIT_NOFILE `nofile`); whether it answers."""

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        argv = [sys.executable, "-m", "ftsup.supervisor", "daemon"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=limits,
            )
        REAPER.pgids.add(self.proc.pid)
        return bool(wait_until(lambda: self.answers(5) or self.proc_dead(), wait, 0.1)) and (
            not self.proc_dead()
        )

    def proc_dead(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def kill(self) -> None:
        """SIGKILL the daemon alone (shims and trainers live in their own sessions)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        """Kill the daemon and everything it started (end of a category)."""
        self.kill()
        for pids_file in self.state.glob("runs/*/*/pids.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                pids = json.loads(pids_file.read_text())
                kill_groups({int(pids["pgid"]), int(pids["shim_pid"])})

    def cli(
        self, *args: str, timeout: float = 30.0, env: dict[str, str] | None = None
    ) -> CliResult:
        argv = [sys.executable, "-m", "ftsup.supervisor", *args]
        proc = subprocess.Popen(
            argv,
            env=env or self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_groups({proc.pid})
            out, err = proc.communicate()
            return CliResult(None, out.decode(errors="replace"), err.decode(errors="replace"))
        return CliResult(
            proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        )

    def answers(self, timeout: float = 10.0) -> bool:
        return self.cli("ls", timeout=timeout).rc == 0

    def status(self, job: str) -> dict[str, Any] | None:
        """`ftsup status JOB --json`; None when the job is unknown or no answer came."""
        return self.status_rc(job)[1]

    def status_rc(self, job: str) -> tuple[int | None, dict[str, Any] | None]:
        res = self.cli("status", job, "--json", timeout=20)
        data = res.json() if res.rc == 0 else None
        return res.rc, data if isinstance(data, dict) else None

    def wait_final(self, job: str, timeout: float) -> dict[str, Any] | None:
        """The job's status once it is no longer live. None if it never got there, and
        early when the daemon has said for 5 s that there is no such job, or when the
        job has said for 15 s that it runs while neither its shim nor its trainer lives."""
        deadline = time.monotonic() + timeout
        missing_since: float | None = None
        stuck_since: float | None = None
        while time.monotonic() < deadline:
            rc, status = self.status_rc(job)
            now = time.monotonic()
            missing_since = (missing_since or now) if rc == 4 else None
            state = status.get("state") if status else None
            stuck_since = (stuck_since or now) if self._stuck(job, state) else None
            if status is not None and state not in LIVE_STATES:
                return status
            if (missing_since and now - missing_since > 5) or (
                stuck_since and now - stuck_since > 15
            ):
                return None
            time.sleep(0.2)
        return None

    def _stuck(self, job: str, state: object) -> bool:
        if state not in ("running", "stopping"):
            return False
        pids = newest_pids(self.state, job)
        return (
            pids is not None
            and not alive(int(pids["shim_pid"]))
            and not group_alive(int(pids["pgid"]))
        )

    def new_log(self) -> str:
        """What the daemon wrote to its output since the last call."""
        try:
            with self.log.open("rb") as f:
                f.seek(self._log_seen)
                data = f.read()
        except OSError:
            return ""
        self._log_seen += len(data)
        return data.decode(errors="replace")

    def health(
        self, deadline: float = 10.0, benign: tuple[str, ...] = ()
    ) -> tuple[Outcome, str] | None:
        """None when the daemon lives, answers a fresh `ls` and logged no traceback
        (other than `benign` ones); otherwise a crash, after which the daemon is
        restarted for the next case."""
        problem = ""
        if self.proc_dead():
            problem = f"the daemon died (exit {self.proc.returncode if self.proc else '?'})"
        elif not self.answers(deadline):
            problem = f"the daemon did not answer `ftsup ls` within {deadline:.0f}s"
        tracebacks = [
            t for t in traceback_summaries(self.new_log()) if not any(b in t for b in benign)
        ]
        if not problem and tracebacks:
            problem = "traceback in the daemon's log: " + "; ".join(tracebacks[:3])
        if not problem:
            return None
        self.kill()
        self.start()
        self.new_log()
        return Outcome.CRASH, problem


def traceback_summaries(log: str) -> list[str]:
    """Each traceback in `log`, shortened to its innermost frame and its exception."""
    found = []
    for chunk in log.split("Traceback (most recent call last):")[1:]:
        lines = chunk.splitlines()[1:]
        end = next((i for i, x in enumerate(lines) if x and not x[0].isspace()), len(lines) - 1)
        frames = [x.strip() for x in lines[:end] if x.startswith("  File ")]
        found.append(f"{frames[-1] if frames else ''} -> {lines[end] if lines else ''}")
    return found


@contextlib.contextmanager
def category_daemon(root: Path, **kwargs: Any) -> Iterator[Daemon]:
    """A daemon for one category, everything it started killed at the end."""
    daemon = Daemon(root, **kwargs)
    try:
        yield daemon
    finally:
        daemon.stop()
