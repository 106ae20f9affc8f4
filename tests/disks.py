"""Real small file systems for the tests: tmpfs mounts that fill up for real.

We run as root here and in CI; a test that cannot mount fails with what is
missing (never skips). Every mount is unmounted, even when the test fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "1m", *options: str) -> Iterator[Path]:
    """`folder` (created if needed) as a tmpfs of `size`, e.g. options "mode=0700", "ro"."""
    folder.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"cannot mount a tmpfs at {folder}: {result.stderr.strip()} "
        "(the fault tests need root and mount, as CI has)"
    )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the file system has not one byte left; prove it is full."""
    path = folder / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    probe = folder / "probe"
    try:
        with probe.open("wb", buffering=0) as handle:
            handle.write(b"x" * 8192)
            os.fsync(handle.fileno())
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    else:
        raise AssertionError(f"{folder} still takes writes after filling it")
    finally:
        probe.unlink(missing_ok=True)
    return path
