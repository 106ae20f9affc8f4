"""Evidence that the kernel's OOM killer, not a person, sent a SIGKILL.

A trainer killed by SIGKILL leaves no message of its own. The kernel log names
the victim ("Out of memory: Killed process 4821 (python)"), but `dmesg` is often
forbidden to non-root users; the memory cgroup's `oom_kill` counter is readable
and rises with every kill inside the cgroup. So: capture the counter while the
trainer lives (`OomBaseline.capture`), compare after it died. Best effort: every
function here returns None rather than raise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def find_oom_line(kernel_log: str, pid: int) -> str | None:
    """The kernel's OOM-kill line for `pid` in dmesg text (timestamp removed)."""
    victim = re.compile(
        rf"(?:Out of memory|Memory cgroup out of memory): Killed process {pid}\b"
        rf"|oom-kill:.*[,:]pid={pid}[,\s]|oom_reaper: reaped process {pid}\b"
    )
    found = None
    for line in kernel_log.splitlines():
        if victim.search(line):
            text = re.sub(r"^\[\s*[\d.]+\]\s*", "", line.strip())
            # Prefer the "Killed process" line: it names the process and its memory.
            if found is None or "Killed process" in text:
                found = text
    return found


def _read_dmesg(timeout: float) -> str | None:
    exe = shutil.which("dmesg")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            errors="replace",
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def cgroup_dir(pid: int, root: Path = CGROUP_ROOT) -> Path | None:
    """The memory cgroup directory of a live process (cgroup v2, or v1 `memory`)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = root / path.lstrip("/")
        elif "memory" in controllers.split(","):
            v1 = root / "memory" / path.lstrip("/")
    for candidate in (v1, v2):
        if candidate is not None and _counter_file(candidate) is not None:
            return candidate
    return None


def _counter_file(directory: Path) -> Path | None:
    for name in ("memory.events", "memory.oom_control"):  # v2, v1
        if (directory / name).is_file():
            return directory / name
    return None


def oom_kill_count(directory: Path) -> int | None:
    """The `oom_kill` counter of a cgroup (v2 `memory.events`, v1 `memory.oom_control`)."""
    path = _counter_file(directory)
    if path is None:
        return None
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


@dataclass(frozen=True)
class OomBaseline:
    """The trainer's memory cgroup and its `oom_kill` count when the attempt started."""

    cgroup: Path
    oom_kills: int

    @classmethod
    def capture(cls, pid: int, root: Path = CGROUP_ROOT) -> OomBaseline | None:
        directory = cgroup_dir(pid, root)
        if directory is None:
            return None
        count = oom_kill_count(directory)
        return None if count is None else cls(directory, count)


def read_oom_record(
    pid: int, *, baseline: OomBaseline | None = None, dmesg_timeout: float = 2.0
) -> str | None:
    """The kernel's or the cgroup's record of an OOM kill of `pid`, where readable.

    The kernel log names the pid, so it is checked first. The cgroup counter
    names no process: it counts only when a baseline was taken during the
    attempt and the count has risen since.
    """
    try:
        log = _read_dmesg(dmesg_timeout)
        line = find_oom_line(log, pid) if log else None
        if line:
            return f"kernel: {line}"
        if baseline is not None:
            now = oom_kill_count(baseline.cgroup)
            if now is not None and now > baseline.oom_kills:
                return (
                    f"cgroup {baseline.cgroup}: oom_kill rose from {baseline.oom_kills} "
                    f"to {now} during the attempt"
                )
    except Exception:  # best effort by contract: a diagnosis must never fail
        return None
    return None
