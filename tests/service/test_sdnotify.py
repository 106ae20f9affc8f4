"""sd_notify against a real AF_UNIX datagram socket, in-process and from a subprocess."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ftsup.supervisor.service.sdnotify import (
    Heartbeat,
    Notifier,
    clean_child_env,
    watchdog_interval,
    watchdog_loop,
)

from .conftest import DatagramReceiver


def test_messages_arrive(notify_socket: tuple[str, DatagramReceiver]) -> None:
    path, receiver = notify_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    try:
        assert notifier.enabled
        assert notifier.ready(status="2 runs, 1/1 GPUs healthy")
        assert notifier.status("3 runs\n  training")
        assert notifier.watchdog()
        assert notifier.extend_timeout(1.5)
        assert notifier.stopping()
        receiver.wait_for("STOPPING=1")
    finally:
        notifier.close()
    assert receiver.texts() == [
        "READY=1\nSTATUS=2 runs, 1/1 GPUs healthy",
        "STATUS=3 runs training",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=1500000",
        "STOPPING=1",
    ]


def test_abstract_socket() -> None:
    name = f"ftsup-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = DatagramReceiver("\0" + name)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier.ready()
        receiver.wait_for("READY=1")
    finally:
        notifier.close()
        receiver.close()


def test_noop_without_socket(short_tmp: Path) -> None:
    assert not Notifier.from_env({}).ready()
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1"}).enabled
    # A socket that nobody listens on: no exception, just False.
    assert not Notifier(str(short_tmp / "missing.sock")).watchdog()


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    own = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(own) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


def test_clean_child_env() -> None:
    env = {
        "PATH": "/usr/bin",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "12",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "12",
        "LISTEN_FDNAMES": "x",
        "JOURNAL_STREAM": "8:123",
        "INVOCATION_ID": "0123abcd",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    assert clean_child_env(env) == {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0"}
    assert "NOTIFY_SOCKET" in env  # the input is not modified


async def test_pings_at_half_watchdog_usec(notify_socket: tuple[str, DatagramReceiver]) -> None:
    path, receiver = notify_socket
    interval = watchdog_interval({"WATCHDOG_USEC": "200000"})
    assert interval == 0.1
    notifier = Notifier(path)
    task = asyncio.create_task(watchdog_loop(notifier, interval, lambda: True))
    try:
        await asyncio.sleep(0.75)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()
    await asyncio.sleep(0.05)
    times = receiver.times_of("WATCHDOG=1")
    assert 5 <= len(times) <= 9, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Half of 200 ms; single gaps may stretch when the CI machine is busy.
    assert 0.08 <= statistics.median(gaps) <= 0.13, gaps
    assert min(gaps) >= 0.07, gaps


async def test_pings_stop_while_loop_is_blocked(
    notify_socket: tuple[str, DatagramReceiver],
) -> None:
    path, receiver = notify_socket
    notifier = Notifier(path)
    task = asyncio.create_task(watchdog_loop(notifier, 0.05, lambda: True))
    try:
        await asyncio.sleep(0.3)
        blocked_from = time.monotonic()
        time.sleep(0.6)  # a stuck event loop: nothing on it runs
        blocked_until = time.monotonic()
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()
    await asyncio.sleep(0.05)
    times = receiver.times_of("WATCHDOG=1")
    before = [t for t in times if t < blocked_from]
    during = [t for t in times if blocked_from + 0.1 < t < blocked_until]
    after = [t for t in times if t >= blocked_until]
    assert len(before) >= 3
    assert during == []
    assert len(after) >= 3  # and they resume once the loop runs again


async def test_pings_withheld_when_liveness_fails(
    notify_socket: tuple[str, DatagramReceiver],
) -> None:
    path, receiver = notify_socket
    notifier = Notifier(path)
    heartbeat = Heartbeat()
    task = asyncio.create_task(watchdog_loop(notifier, 0.05, heartbeat.fresh_within(0.2)))
    try:
        await asyncio.sleep(0.5)  # nobody beats: pings for ~0.2 s, then none
        stale_at = time.monotonic()
        count_stale = len(receiver.times_of("WATCHDOG=1"))
        await asyncio.sleep(0.3)
        assert len(receiver.times_of("WATCHDOG=1")) == count_stale
        heartbeat.beat()
        await asyncio.sleep(0.15)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()
    await asyncio.sleep(0.05)
    assert [t for t in receiver.times_of("WATCHDOG=1") if t > stale_at]


SCRIPT = textwrap.dedent(
    """
    import asyncio, os, socket, subprocess, sys
    from ftsup.supervisor.service.sdnotify import (
        Notifier, clean_child_env, watchdog_interval, watchdog_loop)

    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(sys.argv[1])
    control.listen()
    notifier = Notifier.from_env()
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('NOTIFY_SOCKET', '-'))"],
        env=clean_child_env(os.environ), capture_output=True, text=True, check=True)
    notifier.ready(status="child sees NOTIFY_SOCKET=" + child.stdout.strip())

    async def main():
        task = asyncio.create_task(
            watchdog_loop(notifier, watchdog_interval(), lambda: True))
        await asyncio.sleep(0.35)
        task.cancel()
        notifier.stopping()
    asyncio.run(main())
    """
)


def test_subprocess_uses_notifier(
    notify_socket: tuple[str, DatagramReceiver], short_tmp: Path
) -> None:
    path, receiver = notify_socket
    control = short_tmp / "ctl.sock"
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(control)], env=env)
    try:
        receiver.wait_for("READY=1\nSTATUS=child sees NOTIFY_SOCKET=-", timeout=20)
        # READY comes after the socket is bound: connecting must already work.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(control))
        receiver.wait_for("STOPPING=1", timeout=20)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(receiver.times_of("WATCHDOG=1")) >= 3
