"""Process identity from /proc: a pid alone can be recycled, pid + start time cannot."""

from __future__ import annotations

import os
import signal


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (field 22 of /proc/PID/stat); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    state = fields[0]
    if state == b"Z":  # a zombie has exited; only its exit status is left
        return None
    return int(fields[19])


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
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members
