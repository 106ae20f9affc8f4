"""Per-file integrity by kind, and the size and last-write time of a folder.

The format checkers decide which files must exist; this module only says
whether one file that exists is readable, so every format shares one rule.
Every open goes through `userfiles` (a FIFO or device is a finding, never a
hang). A read that fails for a reason outside the bytes (EMFILE, EACCES, EIO)
propagates as OSError: the caller records "could not check", never "corrupt".
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..userfiles import NotRegularFile, describe_mode, open_binary
from .safetensors_check import check_safetensors
from .torchzip_check import check_torch_zip

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_SMALL_JSON = 1024 * 1024  # parsed on the fast path; larger ones only on deep


def check_file(path: Path, *, deep: bool = False) -> str | None:
    """None when intact or of a kind without structure, else the problem.

    The message names the file relative to its checkpoint by the caller; here it
    is the predicate only ("truncated: central directory missing").
    """
    try:
        mode = path.stat().st_mode  # never blocks, even on a FIFO
        if not stat.S_ISREG(mode):
            return f"is {describe_mode(mode)}, not a regular file"
        if path.suffix == ".safetensors":
            return check_safetensors(path, deep=deep)
        if path.suffix in TORCH_SUFFIXES:
            return check_torch_zip(path, deep=deep)
        if path.suffix == ".json":
            return check_json(path, deep=deep)
    except FileNotFoundError:
        return "missing"
    except NotRegularFile as exc:
        return f"is {exc.what}, not a regular file"
    return None


def check_json(path: Path, *, deep: bool = False) -> str | None:
    with open_binary(path, follow=True) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return "is empty (0 bytes)"
        if size > _SMALL_JSON and not deep:
            return None
        raw = handle.read()
    try:
        json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return f"unparseable: {exc}"
    return None


def folder_stats(folder: Path) -> tuple[int, float]:
    """(total bytes of every file below, newest mtime of any file or folder below).

    The newest mtime is the time of the last write: a deletion or rename also
    updates its folder's mtime. Files that vanish while walking are skipped.
    """
    total = 0
    newest = 0.0
    for root, _dirs, files in os.walk(folder):
        try:
            newest = max(newest, os.stat(root).st_mtime)
        except OSError:
            continue
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_size
            newest = max(newest, st.st_mtime)
    return total, newest
