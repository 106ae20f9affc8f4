"""One attempt as the daemon sees it: the shim it launched (or re-adopted) and the
files the shim writes. Process handling is by pid *and* start time, always."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.atomicio import read_json
from ftsup.supervisor.contract import PIDS_FILE
from ftsup.supervisor.daemon.exitwatch import wait_for_exit
from ftsup.supervisor.procinfo import belongs_to, is_same_process, signal_group, signal_within

KILL_FILE = "kill.json"  # who killed the attempt and why, read when judging its exit


@dataclass
class LiveAttempt:
    """An attempt whose shim may still be running."""

    n: int
    attempt_dir: Path
    shim_pid: int
    shim_start: int | None
    start_step: int
    resume_from: Path | None
    started_at: float
    child: subprocess.Popen[bytes] | None = None  # set when this daemon started it

    def pids(self) -> dict[str, Any]:
        """What the shim wrote to pids.json; {} when missing, damaged or unreadable."""
        try:
            pids = read_json(self.attempt_dir / PIDS_FILE)
        except OSError:
            return {}
        return pids if isinstance(pids, dict) else {}

    def shim_alive(self) -> bool:
        """The shim is still the process this attempt started (pid and start time)."""
        return is_same_process(self.shim_pid, self.shim_start)

    def signal_shim(self, sig: signal.Signals) -> bool:
        """SIGTERM to the shim is a graceful stop: it forwards, waits, escalates.
        False when the shim is gone: then nobody forwards, the caller must act."""
        if not self.shim_alive():
            return False
        try:
            os.kill(self.shim_pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def trainer(self) -> tuple[int, int | None] | None:
        """(pid, start time) of the trainer, from pids.json; None before the shim wrote it."""
        pids = self.pids()
        pid, start = pids.get("trainer_pid"), pids.get("trainer_start")
        if not isinstance(pid, int) or isinstance(pid, bool):
            return None
        return pid, start if isinstance(start, int) else None

    def signal_trainer(self, sig: signal.Signals) -> bool:
        """`sig` to the trainer's whole process group (checked by the leader's start time)."""
        pids = self.pids()
        pgid, start = pids.get("pgid"), pids.get("trainer_start")
        if not isinstance(pgid, int):
            return False
        return signal_group(pgid, sig, leader_start_time=start)

    def owner(self) -> Callable[[int], bool]:
        """Whether a pid is one of this attempt's trainer processes (pids.json read
        once, for many pids)."""
        pids = self.pids()
        pgid, start = pids.get("pgid"), pids.get("trainer_start")
        if not isinstance(pgid, int):
            return lambda _pid: False
        return lambda pid: belongs_to(pid, pgid, leader_start_time=start)

    def signal_process(self, pid: int, sig: signal.Signals) -> bool:
        """`sig` to one process of the trainer's (and to no other process)."""
        pids = self.pids()
        pgid, start = pids.get("pgid"), pids.get("trainer_start")
        if not isinstance(pgid, int):
            return False
        return signal_within(pid, pgid, sig, leader_start_time=start)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "started_at": self.started_at,
            "resume_from": str(self.resume_from) if self.resume_from else None,
            "start_step": self.start_step,
            "shim_pid": self.shim_pid,
            "trainer_pid": self.pids().get("trainer_pid"),
        }


async def wait_until_gone(pid: int, start: int | None) -> None:
    """Wait for a process that is not ours (pidfd; polling where pidfd is unavailable)."""
    try:
        await wait_for_exit(pid, start)
    except OSError:
        while is_same_process(pid, start):
            await asyncio.sleep(0.5)
