"""Daemon logging to stderr, in the form journald keeps well.

Under systemd stderr goes to the journal, which timestamps every line itself
and reads a leading `<N>` as the syslog priority (`<3>` error ... `<7>` debug),
so `journalctl -p warning` works. Elsewhere (a terminal, a log file) lines carry
their own timestamps. Journald is detected as systemd documents it: stderr's
device and inode equal `JOURNAL_STREAM`, so an inherited variable is ignored.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

# syslog priorities (sd-daemon.h): 2 crit, 3 err, 4 warning, 5 notice, 6 info, 7 debug.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

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
    handler = logging.StreamHandler(stream)
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
