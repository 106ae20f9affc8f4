"""Daemon logging to stderr, in the form journald keeps well.

Under systemd stderr goes to the journal, which timestamps every line itself
and reads a leading `<N>` as the syslog priority (`<3>` error ... `<7>` debug),
so `journalctl -p warning` works. Elsewhere (a terminal, a log file) lines carry
their own timestamps. Journald is detected as systemd documents it: stderr's
device and inode equal `JOURNAL_STREAM`, so an inherited variable is ignored.

When stderr is a file (`ftsup start` points it at `daemon.log`) the disk may
fill: lines that cannot be written wait in a bounded backlog and are written,
in order, with the next line once space returns. Logging never raises into the
daemon.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

# syslog priorities (sd-daemon.h): 2 crit, 3 err, 4 warning, 5 notice, 6 info, 7 debug.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

BACKLOG_BYTES = 1024 * 1024  # lines kept while the log's disk is full; older ones are dropped
PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


class JournalFormatter(logging.Formatter):
    """No timestamp; `<N>` on every line, since journald splits a traceback into entries."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class ResilientStreamHandler(logging.Handler):
    """Writes whole lines to the stream's descriptor; keeps what the disk refused."""

    def __init__(self, stream: TextIO, backlog_bytes: int = BACKLOG_BYTES) -> None:
        super().__init__()
        self.stream = stream
        self.backlog_bytes = backlog_bytes
        self._backlog: collections.deque[bytes] = collections.deque()
        self._pending = 0  # bytes in the backlog
        self._dropped = 0  # lines dropped from a full backlog
        self._partial = False  # the first queued line was written in part
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None  # not a real file (io.StringIO): write through the stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(errors="replace")
        except Exception:
            self.handleError(record)
            return
        self._queue(line)
        self._drain()

    @property
    def backlog(self) -> int:
        """Lines waiting for the disk."""
        return len(self._backlog)

    def _queue(self, line: bytes) -> None:
        self._backlog.append(line)
        self._pending += len(line)
        while self._pending > self.backlog_bytes and len(self._backlog) > 1:
            self._pending -= len(self._backlog.popleft())
            self._dropped += 1
            self._partial = False

    def _drain(self) -> None:
        if self._dropped:
            note = (
                f"ftsup: at least {self._dropped} log lines lost (the log could not be written)\n"
            )
            self._backlog.insert(1 if self._partial else 0, note.encode())
            self._pending += len(note.encode())
            self._dropped = 0
        while self._backlog and self._write_head():
            pass

    def _write_head(self) -> bool:
        """Write the oldest queued bytes; False when refused (they stay queued)."""
        data = self._backlog[0]
        try:
            if self._fd is None:
                self.stream.write(data.decode(errors="replace"))
                self.stream.flush()
                written = len(data)
            else:
                written = os.write(self._fd, data)
        except (OSError, ValueError):  # full disk, closed stream: keep the line for later
            return False
        self._pending -= written
        self._partial = 0 < written < len(data)
        if written < len(data):  # the disk took the start of a line: the rest is still owed
            self._backlog[0] = data[written:]
        else:
            self._backlog.popleft()
        return written > 0


def under_journald(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when `stream` (stderr) is the journal stream systemd connected us to."""
    env = os.environ if env is None else env
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    stream = sys.stderr if stream is None else stream
    try:
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError):
        return False


def setup_daemon_logging(
    level: int | str = logging.INFO,
    *,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Route the root logger to `stream` (stderr); calling again replaces the handler."""
    stream = sys.stderr if stream is None else stream
    handler = ResilientStreamHandler(stream)
    if under_journald(stream, env):
        handler.setFormatter(JournalFormatter(JOURNAL_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    handler.set_name("ftsup-daemon")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "ftsup-daemon"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
