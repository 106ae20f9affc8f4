"""Process identity from /proc: a pid alone can be recycled, pid + start time cannot."""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

# Out of descriptors, "could not read /proc" must not read as "the process is
# gone" (the daemon would record a live run as ended). One descriptor is kept
# in reserve and given up for the read, as libuv and nginx do for accept().
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
_spare_lock = threading.Lock()
_spare_fd: int | None = None


class ProcessUnreadable(OSError):
    """/proc/PID/stat exists but could not be read (no descriptors, no memory)."""


def _reserve_spare() -> None:
    global _spare_fd
    if _spare_fd is None:
        try:
            _spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            _spare_fd = None


def _read_stat(pid: int | str) -> bytes:
    path = f"/proc/{pid}/stat"
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        if exc.errno not in _OUT_OF_DESCRIPTORS:
            raise
    global _spare_fd
    with _spare_lock:
        if _spare_fd is not None:
            os.close(_spare_fd)
            _spare_fd = None
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS or exc.errno == errno.ENOMEM:
                raise ProcessUnreadable(exc.errno, f"cannot read {path}: {exc.strerror}") from exc
            raise
        finally:
            _reserve_spare()


_reserve_spare()


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, or None when the process is gone or a
    zombie (it has exited; only its exit status is left). Raises ProcessUnreadable
    when it exists but cannot be read now."""
    try:
        data = _read_stat(pid)
    except ProcessUnreadable:
        raise
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return None if fields[0] == b"Z" else fields


def _live_processes() -> Iterator[tuple[int, list[bytes]]]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(entry)
        except ProcessUnreadable:
            continue
        if fields is not None:
            yield int(entry), fields


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (field 22 of /proc/PID/stat); None if gone.
    Raises ProcessUnreadable when the process exists but /proc cannot be read now."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def is_same_process(pid: int, start_time: int | None) -> bool:
    """True when `pid` is alive and is the process that started at `start_time`.

    When /proc cannot be read (no descriptors left), a pid that still exists is
    taken to be ours: supervision must never declare a live run ended for want
    of a descriptor; the next check, with descriptors back, decides.
    """
    if pid <= 0 or start_time is None:
        return False
    try:
        return process_start_time(pid) == start_time
    except ProcessUnreadable:
        return _exists(pid)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: signal.Signals, *, leader_start_time: int | None) -> bool:
    """Signal a process group, but only while its leader is the process we started.

    Returns False when the group is gone (or its leader was replaced), so we
    never signal a stranger's processes after a pid was recycled.
    """
    # The leader may have exited while other members live on: signal them only
    # if the leader's pid was not reused by another process meanwhile.
    try:
        leader_replaced = (
            leader_start_time is not None
            and not is_same_process(pgid, leader_start_time)
            and process_start_time(pgid) is not None
        )
    except ProcessUnreadable:
        leader_replaced = False  # is_same_process already judged it ours
    if leader_replaced:
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


MAX_ANCESTRY = 64  # parents followed up from a process (a loop-safe bound)


def belongs_to(pid: int, pgid: int, *, leader_start_time: int | None) -> bool:
    """Whether `pid` is one of a trainer's processes: a member of group `pgid`, or a
    descendant of its leader (torchrun starts each worker in a session of its own).
    A recycled pid is neither. Unreadable: False."""
    try:
        fields = _stat_fields(pid)
        if fields is None:
            return False
        return int(fields[2]) == pgid or (
            is_same_process(pgid, leader_start_time) and _descends_from(fields, pgid)
        )
    except ProcessUnreadable:
        return False


def signal_within(
    pid: int, pgid: int, sig: signal.Signals, *, leader_start_time: int | None
) -> bool:
    """Signal one process of a trainer's (`belongs_to`), never a stranger's."""
    if not belongs_to(pid, pgid, leader_start_time=leader_start_time):
        return False
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _descends_from(fields: list[bytes], ancestor: int) -> bool:
    for _ in range(MAX_ANCESTRY):
        parent = int(fields[1])
        if parent == ancestor:
            return True
        if parent <= 1:
            return False
        found = _stat_fields(parent)
        if found is None:
            return False
        fields = found
    return False


def environment(pid: int) -> dict[str, str]:
    """The environment a process was started with (/proc/PID/environ; ours only).
    Raises OSError when it cannot be read."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is `pgid` (used to prove no orphans remain)."""
    return [pid for pid, fields in _live_processes() if int(fields[2]) == pgid]


def child_pids(parent: int) -> list[int]:
    """Live direct children of `parent` (field 4, the ppid)."""
    return [pid for pid, fields in _live_processes() if int(fields[1]) == parent]
