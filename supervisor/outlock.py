"""The output-folder lock: two trainers must never write the same checkpoints.

The shim takes an exclusive `flock` on `<output_dir>/.ftsup.lock` before it
starts the trainer and hands the open descriptor to the trainer, so the lock
lives exactly as long as someone who may write checkpoints: it survives the
daemon and even the shim, and the kernel drops it when the last holder dies.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".ftsup.lock"


class OutputLocked(Exception):
    """Someone else holds the lock; `holder` is what they wrote into it."""

    def __init__(self, path: Path, holder: dict[str, Any] | None) -> None:
        who = f"job {holder.get('job')!r} (shim pid {holder.get('pid')})" if holder else "?"
        super().__init__(f"{path.parent} is in use by {who}")
        self.path = path
        self.holder = holder


def lock_path(output_dir: Path) -> Path:
    return output_dir / LOCK_NAME


def read_holder(output_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(lock_path(output_dir).read_text() or "null")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def acquire(output_dir: Path, holder: dict[str, Any]) -> int:
    """Take the lock and return its descriptor (inheritable by the trainer)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(output_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputLocked(path, read_holder(output_dir)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


def acquire_after_predecessor(
    output_dir: Path, holder: dict[str, Any], *, timeout: float = 30.0
) -> int:
    """`acquire`, but wait while the holder is an earlier attempt of the same job.

    A killed trainer's process group dies asynchronously (data-loader workers
    inherit the descriptor), so the next attempt can be ready a few
    milliseconds before the kernel drops the lock; another job's lock, or one
    held longer than `timeout`, is refused at once or then.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return acquire(output_dir, holder)
        except OutputLocked as exc:
            same_job = exc.holder is not None and exc.holder.get("job") == holder.get("job")
            if not same_job or time.monotonic() >= deadline:
                raise
        time.sleep(0.02)


def is_locked(output_dir: Path) -> bool:
    """True when a live process holds the lock (probe without keeping it)."""
    path = lock_path(output_dir)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
