"""Append-only progress events (`FTSUP_PROGRESS_FILE`), one JSON object per line.

The supervisor tails this file to see steps, losses and checkpoints, and to
notice a hang. Each event is written with a single `write` on an O_APPEND
descriptor and flushed, so a reader never sees half a line from a live writer,
and a killed trainer loses at most the event it was writing.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

PROGRESS_ENV = "FTSUP_PROGRESS_FILE"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ProgressWriter:
    """Thread-safe writer; a writer without a path drops every event."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._fd: int | None = None

    @classmethod
    def from_env(cls) -> ProgressWriter:
        return cls(os.environ.get(PROGRESS_ENV) or None)

    def emit(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"ts": round(time.time(), 3), "event": event}
        record.update({key: _clean(value) for key, value in fields.items()})
        line = (json.dumps(record) + "\n").encode()
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
