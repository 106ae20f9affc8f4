"""Process identity from /proc: a pid alone can be recycled, pid + start time cannot."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, or None when the process is gone or a
    zombie (it has exited; only its exit status is left)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return None if fields[0] == b"Z" else fields


def _live_processes() -> Iterator[tuple[int, list[bytes]]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) is not None:
            yield int(entry), fields


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (field 22 of /proc/PID/stat); None if gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def is_same_process(pid: int, start_time: int | None) -> bool:
    """True when `pid` is alive and is the process that started at `start_time`."""
    if pid <= 0 or start_time is None:
        return False
    return process_start_time(pid) == start_time


def signal_group(pgid: int, sig: signal.Signals, *, leader_start_time: int | None) -> bool:
    """Signal a process group, but only while its leader is the process we started.

    Returns False when the group is gone (or its leader was replaced), so we
    never signal a stranger's processes after a pid was recycled.
    """
    # The leader may have exited while other members live on: signal them only
    # if the leader's pid was not reused by another process meanwhile.
    leader_replaced = (
        leader_start_time is not None
        and not is_same_process(pgid, leader_start_time)
        and process_start_time(pgid) is not None
    )
    if leader_replaced:
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is `pgid` (used to prove no orphans remain)."""
    return [pid for pid, fields in _live_processes() if int(fields[2]) == pgid]


def child_pids(parent: int) -> list[int]:
    """Live direct children of `parent` (field 4, the ppid)."""
    return [pid for pid, fields in _live_processes() if int(fields[1]) == parent]
