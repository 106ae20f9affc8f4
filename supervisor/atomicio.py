"""Small durable-write helpers: a file is either the old version or the new one."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Temporary name, fsync, rename: readers never see a half-written file.

    On failure (ENOSPC, EIO...) the temporary file is removed and the OSError
    raised: a full disk must not also collect empty `.tmp` files. The file is
    private (0600): state files may hold a job's `[command] env`.
    """
    text = json.dumps(data, indent=1, sort_keys=True, default=str)  # TypeError before any file
    write_text_atomic(path, text)


def write_text_atomic(path: Path, text: str) -> None:
    """`write_json_atomic` for text that is already serialised (a job file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or not (yet) valid JSON."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def tail_lines(path: Path, count: int, *, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `count` lines of a (possibly huge) log file, reading only its end."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except FileNotFoundError:
        return []
    lines = data.decode(errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line is probably cut
    return lines[-count:] if count > 0 else []
