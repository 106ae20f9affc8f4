"""A cheap `tail -f`: the complete lines appended to a file since the last call.

Keeps a partially written last line until its newline arrives, and starts over
when the file is replaced or truncated. Reading is bounded per call so a huge
backlog never stalls the daemon's loop.
"""

from __future__ import annotations

from pathlib import Path

_MAX_LINE = 1 << 20
_MAX_READ = 4 << 20


class LineFollower:
    def __init__(self, path: Path, *, from_end: bool = False) -> None:
        self.path = path
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""
        if from_end:
            try:
                stat = path.stat()
                self._inode, self._offset = stat.st_ino, stat.st_size
            except FileNotFoundError:
                pass

    def read_lines(self) -> list[bytes]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self._inode, self._offset, self._partial = stat.st_ino, 0, b""
        if stat.st_size == self._offset:
            return []
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read(min(stat.st_size - self._offset, _MAX_READ))
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        if len(self._partial) > _MAX_LINE:
            chunks.append(self._partial)
            self._partial = b""
        return chunks
