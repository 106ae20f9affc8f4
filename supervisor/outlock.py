"""The output-folder lock: two trainers must never write the same checkpoints.

The shim takes an exclusive `flock` on `<output_dir>/.ftsup.lock` before it
starts the trainer and hands the open descriptor to the trainer, so the lock
lives exactly as long as someone who may write checkpoints: it survives the
daemon and even the shim, and the kernel drops it when the last holder dies.

A multi-node job (`[launch] nnodes > 1`) has one trainer per node, all writing
the same (shared) folder: each node's shim takes the lock *shared*, plus a
shared lock on the job's own group file `.ftsup.group-<rdzv id>.lock`. A
single-node job's exclusive lock still excludes them all, and a node of
another multi-node job is refused when a live process holds another group's
file (probed with a non-blocking exclusive lock, which fails while anyone
holds it). Two groups starting at the same instant may both be refused: never
both admitted. Across machines this relies on the shared file system's flock
(NFSv4 and Lustre with `flock` mount options provide it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import OUTPUT_LOCK_NAME
from ftsup.supervisor.userfiles import NotRegularFile, open_regular, read_bytes

_HOLDER_MAX = 64 * 1024


class OutputLocked(Exception):
    """Someone else holds the lock; `holder` is what they wrote into it."""

    def __init__(self, path: Path, holder: dict[str, Any] | None) -> None:
        who = f"job {holder.get('job')!r} (shim pid {holder.get('pid')})" if holder else "?"
        super().__init__(f"{path.parent} is in use by {who}")
        self.path = path
        self.holder = holder


class LockFileUnusable(OutputLocked):
    """Something other than a regular file sits at the lock's name (a FIFO, a
    symlink, a folder): never opened through, never truncated. An OutputLocked
    so that the shim refuses the attempt the same clear way."""

    def __init__(self, path: Path, problem: NotRegularFile) -> None:
        super().__init__(path, None)
        self.args = (unusable_message(path, problem),)


def unusable_message(path: Path, problem: NotRegularFile) -> str:
    return (
        f"{path} is {problem.what}, not a regular file: ftsup will not open it "
        f"(remove it, e.g. `rm {path}`, and start again)"
    )


def lock_path(output_dir: Path) -> Path:
    return output_dir / OUTPUT_LOCK_NAME


def read_holder(output_dir: Path) -> dict[str, Any] | None:
    """What the holder wrote; None when absent, unreadable or not a regular file."""
    return _read_json(lock_path(output_dir))


def acquire(output_dir: Path, holder: dict[str, Any]) -> int:
    """Take the lock and return its descriptor (inheritable by the trainer)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(output_dir)
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputLocked(path, read_holder(output_dir)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


GROUP_PREFIX = ".ftsup.group-"
GROUP_SUFFIX = ".lock"


def group_lock_path(output_dir: Path, group: str) -> Path:
    """The multi-node job's own lock file (its rendezvous id, made a safe name)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", group)[:120]
    return output_dir / f"{GROUP_PREFIX}{safe}{GROUP_SUFFIX}"


def _open_lock(path: Path) -> int:
    try:  # O_NOFOLLOW: a symlink here must never truncate its target
        return open_regular(path, os.O_RDWR | os.O_CREAT, 0o644)
    except NotRegularFile as exc:
        raise LockFileUnusable(path, exc) from None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(read_bytes(path, limit=_HOLDER_MAX) or b"null")
    except (OSError, NotRegularFile, ValueError):
        return None
    return data if isinstance(data, dict) else None


def acquire_for_group(output_dir: Path, holder: dict[str, Any], group: str) -> list[int]:
    """One node's share of a multi-node job's lock: [folder lock, group lock], both
    shared and inheritable by the trainer (see the module docstring)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"job": holder.get("job"), "group": group}).encode()
    fds: list[int] = []
    try:
        main = lock_path(output_dir)
        fds.append(_open_lock(main))
        try:
            fcntl.flock(fds[0], fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(main, read_holder(output_dir)) from None
        own = group_lock_path(output_dir, group)
        fds.append(_open_lock(own))
        try:
            fcntl.flock(fds[1], fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # another group's node is probing it right now
            raise OutputLocked(own, _read_json(own)) from None
        other = _live_other_group(output_dir, own)
        if other is not None:
            raise OutputLocked(other, _read_json(other))
        for fd in fds:  # the same bytes from every node: concurrent writes agree
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _live_other_group(output_dir: Path, own: Path) -> Path | None:
    """Another multi-node job's group file that a live process holds, if any."""
    for other in sorted(output_dir.glob(f"{GROUP_PREFIX}*{GROUP_SUFFIX}")):
        if other != own and _probe(other, fcntl.LOCK_EX, unusable_raises=False):
            return other
    return None


def _probe(path: Path, mode: int, *, unusable_raises: bool) -> bool:
    """Someone holds `path` against `mode` (a non-blocking lock of that mode fails);
    the probe keeps nothing. A missing file is free; anything but a regular file
    raises LockFileUnusable, or counts as free when not `unusable_raises`."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except NotRegularFile as exc:
        if unusable_raises:
            raise LockFileUnusable(path, exc) from None
        return False
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def acquire_after_predecessor(
    output_dir: Path, holder: dict[str, Any], *, group: str | None = None, timeout: float = 30.0
) -> list[int]:
    """`acquire` (or `acquire_for_group`), but wait while the holder is an earlier
    attempt of the same job; the descriptors to hand to the trainer.

    A killed trainer's process group dies asynchronously (data-loader workers
    inherit the descriptor), so the next attempt can be ready a few
    milliseconds before the kernel drops the lock; another job's lock, or one
    held longer than `timeout`, is refused at once or then.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if group is not None:
                return acquire_for_group(output_dir, holder, group)
            return [acquire(output_dir, holder)]
        except OutputLocked as exc:
            same_job = exc.holder is not None and exc.holder.get("job") == holder.get("job")
            if not same_job or time.monotonic() >= deadline:
                raise
        time.sleep(0.02)


def is_locked(output_dir: Path, *, group: str | None = None) -> bool:
    """True when a live process holds the lock against us (probe without keeping it):
    anyone at all for a single-node job; a single-node job, or another group's
    node, for a node of the multi-node job `group`.

    Raises LockFileUnusable when the name holds anything but a regular file.
    """
    mode = fcntl.LOCK_EX if group is None else fcntl.LOCK_SH
    if _probe(lock_path(output_dir), mode, unusable_raises=True):
        return True
    if group is None:
        return False
    return _live_other_group(output_dir, group_lock_path(output_dir, group)) is not None


def output_dir_problem(output_dir: Path) -> str | None:
    """Why a run could not write to `output_dir`, in words with the fix; None if fine.

    Checked at submit so that a file, a symlink loop or a read-only folder is a
    clear refusal rather than a shim that dies at launch. A folder that does not
    exist yet is fine when its nearest existing parent can take it.
    """
    path = Path(output_dir)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = path.parent
        while parent != parent.parent and not os.path.lexists(parent):
            parent = parent.parent
        if not parent.is_dir():
            return f"output_dir {path}: {parent} is not a folder (fix [job] output_dir)"
        if not os.access(parent, os.W_OK | os.X_OK):
            return (
                f"output_dir {path} does not exist and {parent} is not writable "
                "(create it, fix its permissions or choose another [job] output_dir)"
            )
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"output_dir {path} is a symlink loop (fix the link or [job] output_dir)"
        if exc.errno == errno.ENOTDIR:
            return f"output_dir {path}: a part of the path is a file, not a folder"
        return f"output_dir {path} cannot be checked: {exc.strerror} (fix [job] output_dir)"
    if not stat.S_ISDIR(st.st_mode):
        return (
            f"output_dir {path} is a file, not a folder "
            "(move it away or choose another [job] output_dir)"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        return (
            f"output_dir {path} is not writable by this user or is on a read-only "
            "file system (fix its permissions or choose another [job] output_dir)"
        )
    return None
