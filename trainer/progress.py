"""Append-only progress events (`FTSUP_PROGRESS_FILE`), one JSON object per line.

The supervisor tails this file to see steps, losses and checkpoints, and to
notice a hang. Each event is written with a single `write` on an O_APPEND
descriptor and flushed, so a reader never sees half a line from a live writer,
and a killed trainer loses at most the event it was writing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import ENV_PROGRESS_FILE, MEMORY_RECORD


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def train_start_fields(
    *,
    step: int,
    max_steps: int,
    resumed: object,
    world_size: int,
    gradient_accumulation_steps: int,
) -> dict[str, Any]:
    """The fields of `train_start`, one definition for every way an attempt starts
    (the callback's, and a resume at `max_steps` that ends at once): the daemon
    reads from them which checkpoint the attempt resumed, whether it was a memory
    snapshot (its goodput counts those apart) and the batch geometry it runs with
    (an elastic job's changes)."""
    return {
        "step": step,
        "max_steps": max_steps,
        "resumed_from": str(resumed) if resumed and step > 0 else None,
        "resumed_from_memory": bool(resumed) and (Path(str(resumed)) / MEMORY_RECORD).is_file(),
        "world_size": world_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
    }


class ProgressWriter:
    """Thread-safe writer; a writer without a path drops every event.

    Progress is a report, not the training: a full or failing disk (ENOSPC,
    EIO, EMFILE, ...) drops the line and counts it (`dropped`), and the next
    event tries again, so the trainer never dies of its progress file. A line
    cut short by the disk is taken back (or, failing that, ended by the next
    line's leading newline), so readers never see two events glued together.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.dropped = 0  # events lost to write errors
        self.last_error: OSError | None = None
        self._cut = False  # a partial line may end the file: start the next with "\n"

    @classmethod
    def from_env(cls) -> ProgressWriter:
        return cls(os.environ.get(ENV_PROGRESS_FILE) or None)

    def emit(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"ts": round(time.time(), 3), "event": event}
        record.update({key: _clean(value) for key, value in fields.items()})
        line = (json.dumps(record) + "\n").encode()
        with self._lock:
            try:
                self._write(line)
            except OSError as exc:
                self.dropped += 1
                self.last_error = exc

    def _write(self, line: bytes) -> None:
        if self._fd is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        fd = self._fd
        if self._cut:
            line = b"\n" + line
        start = os.fstat(fd).st_size
        written = 0
        try:
            while written < len(line):
                written += os.write(fd, line[written:])
        except OSError:
            if written:
                self._take_back(fd, start)
            raise
        self._cut = False

    def _take_back(self, fd: int, size: int) -> None:
        """Remove a partly written line (freeing space needs none)."""
        try:
            os.ftruncate(fd, size)
        except OSError:
            self._cut = True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
