"""Opening and reading files whose path a user controls, without trusting it.

A run's output folder belongs to the user: anything can sit at a name the
daemon expects (a FIFO whose `open()` blocks for ever, a symlink to a file
that a write would clobber, a device). So every such file is opened with
`O_NONBLOCK` (a FIFO or tty cannot block the open), `O_NOFOLLOW` unless the
caller says a link is harmless, and checked with `fstat`: anything but a
regular file is refused with `NotRegularFile`, a finding about the path, never
a hang. Work that may still stall (a dead NFS server) runs in a worker thread
with a deadline (`call_with_deadline`, `in_thread`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")


class NotRegularFile(Exception):
    """`path` is a FIFO, device, socket, folder or (not followed) symlink."""

    def __init__(self, path: Path | str, what: str) -> None:
        super().__init__(f"{path} is {what}, not a regular file")
        self.path = Path(path)
        self.what = what


def describe_mode(mode: int) -> str:
    for test, what in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def open_regular(
    path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o644, *, follow: bool = False
) -> int:
    """A descriptor on the regular file at `path`, or NotRegularFile.

    `follow=True` resolves a symlink (reading through one cannot harm its
    target, and its target is still checked); without it a symlink is refused.
    Other OSErrors (ENOENT, EACCES, EMFILE...) propagate unchanged.
    """
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(
                path, "a symbolic link" if not follow else "a symlink loop"
            ) from None
        if exc.errno == errno.ENXIO:  # a FIFO without reader (write) or a socket
            raise NotRegularFile(path, "a FIFO or socket") from None
        if exc.errno == errno.EISDIR:
            raise NotRegularFile(path, "a folder") from None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(path, describe_mode(st.st_mode))
    return fd


def open_binary(path: Path | str, *, follow: bool = False) -> BinaryIO:
    """`open(path, "rb")`, through `open_regular`."""
    return os.fdopen(open_regular(path, follow=follow), "rb")


def read_bytes(path: Path | str, *, limit: int | None = None, follow: bool = False) -> bytes:
    """The whole file (at most `limit` bytes), through `open_regular`."""
    with open_binary(path, follow=follow) as handle:
        return handle.read() if limit is None else handle.read(limit)


def call_with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """`fn()` in a daemon thread; TimeoutError if it has not returned by `timeout`.

    The thread is left behind when it stalls (nothing can interrupt a read
    stuck in the kernel); being a daemon thread, it never keeps the process up.
    """
    box: dict[str, object] = {}
    done = threading.Event()

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name=f"deadline:{what}", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(errno.ETIMEDOUT, f"{what}: no answer within {timeout:g}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


async def in_thread(fn: Callable[[], T], timeout: float, what: str) -> T:
    """`call_with_deadline` for the event loop: awaits without blocking it.

    Unlike `asyncio.to_thread`, a stalled call does not occupy the default
    executor for ever (which would also hang the daemon's shutdown).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            value, error = fn(), None
        except BaseException as exc:
            value, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=work, name=f"deadline:{what}", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError:
        raise TimeoutError(errno.ETIMEDOUT, f"{what}: no answer within {timeout:g}s") from None
