"""Learning of a process's exit at once, without polling: a pidfd in the event loop.

Works the same for shims the daemon started (its children, which it must also
reap) and for shims it re-adopted after a restart (not its children).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess

from ftsup.supervisor.procinfo import is_same_process


async def wait_for_exit(
    pid: int, start_time: int | None, child: subprocess.Popen[bytes] | None = None
) -> None:
    """Return when the process `pid` (started at `start_time`) has exited."""
    if child is None and not is_same_process(pid, start_time):
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        _reap(child)
        return
    except OSError:  # EMFILE, ENFILE, ENOMEM: no descriptor to wait on; poll instead
        await _poll_until_gone(pid, start_time, child)
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_readable)
    try:
        # A re-adopted pid may have been reused between the check and pidfd_open.
        if child is None and not is_same_process(pid, start_time):
            return
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if exited.done():  # cancelled (the daemon shuts down): the shim runs on; no wait
            _reap(child)


def _reap(child: subprocess.Popen[bytes] | None) -> None:
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)


POLL_INTERVAL = 0.5


async def _poll_until_gone(
    pid: int, start_time: int | None, child: subprocess.Popen[bytes] | None
) -> None:
    """The fallback when no pidfd can be had: an exhausted descriptor table must not
    end supervision (nor be mistaken for the process's end)."""
    while True:
        if child is not None:
            if child.poll() is not None:
                return
        elif not is_same_process(pid, start_time):
            return
        await asyncio.sleep(POLL_INTERVAL)
