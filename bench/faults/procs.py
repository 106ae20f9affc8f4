"""Processes of the fault suite: finding, waiting for and killing them by process
group, so that nothing a run started outlives it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Reaper:
    """Every process group this suite started, killed at the end (daemons first).

    Then the shims and trainers the daemons' `pids.json` name, then anything whose
    command line names this invocation's temporary folder (a shim started just
    before its daemon died, a trainer left unsupervised by a lost database).
    """

    def __init__(self) -> None:
        self.pgids: set[int] = set()
        self.pids: set[int] = set()
        self.state_dirs: list[Path] = []
        self.root: Path | None = None

    def kill_all(self) -> None:
        kill_groups(self.pgids)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)  # a daemon killed mid-spawn has finished dying
        for state in self.state_dirs:
            for pids_file in state.glob("runs/*/*/pids.json"):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    pids = json.loads(pids_file.read_text())
                    kill_groups({int(pids["pgid"]), int(pids["shim_pid"])})
        if self.root is not None:
            kill_groups(set(groups_naming(str(self.root))))
        self.pgids.clear()
        self.pids.clear()


REAPER = Reaper()


def kill_groups(pgids: set[int]) -> None:
    mine = os.getpgid(0)
    for pgid in pgids:
        if pgid > 1 and pgid != mine:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


def groups_naming(text: str) -> list[int]:
    """Process groups of processes (not this one's) whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(os.getpgid(int(proc.name)))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def group_alive(pgid: int) -> bool:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                    return True
    return False


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """The first truthy value of `predicate`, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def newest_pids(state: Path, job: str) -> dict[str, Any] | None:
    """`pids.json` of the job's newest attempt."""
    runs = sorted(
        (state / "runs" / job).glob("attempt-*/pids.json"),
        key=lambda p: int(p.parent.name.split("-")[1]),
    )
    for path in reversed(runs):
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(path.read_text()))
    return None


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
