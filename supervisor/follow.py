"""A cheap `tail -f`: the complete lines appended to a file since the last call.

Keeps a partially written last line until its newline arrives, and starts over
when the file is replaced or truncated. Reading is bounded per call so a huge
backlog never stalls the daemon's loop, and anything but a regular file (a
FIFO put there by the trainer) is never opened: it reads as nothing.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ftsup.supervisor.userfiles import NotRegularFile, open_binary

_MAX_LINE = 1 << 20
_MAX_READ = 4 << 20


@dataclass(frozen=True)
class Appended:
    """What one read found: the complete lines, the file's mtime (None when it could
    not be read) and whether the lines reach its end (nothing is left to read now)."""

    lines: list[bytes]
    mtime: float | None = None
    at_end: bool = True


class LineFollower:
    """`follow=False` for a user's file: a symlink there reads as nothing."""

    def __init__(self, path: Path, *, from_end: bool = False, follow: bool = True) -> None:
        self.path = path
        self._follow = follow
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        if from_end:
            try:
                stat = path.stat()
                self._inode, self._offset = stat.st_ino, stat.st_size
            except FileNotFoundError:
                pass

    def unfinished(self) -> bytes:
        """The last line so far, whose newline has not come yet (tqdm redraws its bar
        with \r and no newline for minutes)."""
        return self._partial

    def read_lines(self) -> list[bytes]:
        return self.read().lines

    def read(self) -> Appended:
        try:
            st = os.stat(self.path, follow_symlinks=self._follow)
        except OSError:
            return Appended([])
        if not stat.S_ISREG(st.st_mode):
            return Appended([])
        if st.st_ino != self._inode or st.st_size < self._offset:
            self._inode, self._offset, self._partial = st.st_ino, 0, b""
        if st.st_size == self._offset:
            return Appended([], st.st_mtime)
        try:
            with open_binary(self.path, follow=self._follow) as handle:
                if os.fstat(handle.fileno()).st_ino != st.st_ino:
                    return Appended([])  # replaced meanwhile: start over at the next call
                handle.seek(self._offset)
                data = handle.read(min(st.st_size - self._offset, _MAX_READ))
                st = os.fstat(handle.fileno())
        except (OSError, NotRegularFile):
            return Appended([])
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        if len(self._partial) > _MAX_LINE:
            chunks.append(self._partial)
            self._partial = b""
        return Appended(chunks, st.st_mtime, self._offset >= st.st_size)
