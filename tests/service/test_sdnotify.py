"""sd_notify against a real AF_UNIX datagram socket, in-process and from a subprocess."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.service import sdnotify
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


class Probe:
    """A liveness check that records, on the loop's side, when each pass ran and its answer.

    `watchdog_loop` pings synchronously right after a passing check, so the passing
    calls counted here are the pings sent: the receiver must see exactly as many.
    """

    def __init__(self, answer: Callable[[], bool] = lambda: True) -> None:
        self.answer = answer
        self.calls: list[tuple[float, bool]] = []

    def __call__(self) -> bool:
        alive = self.answer()
        self.calls.append((time.monotonic(), alive))
        return alive

    def passed(self) -> int:
        return sum(alive for _, alive in self.calls)

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.calls}"
            await asyncio.sleep(0.01)


class SleepSpy:
    """`asyncio` as sdnotify sees it, with `sleep` recording what it was asked for."""

    def __init__(self) -> None:
        self.requested: list[float] = []

    async def sleep(self, delay: float) -> None:
        self.requested.append(delay)
        await asyncio.sleep(delay)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_pings_at_half_watchdog_usec(
    notify_socket: tuple[str, DatagramReceiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, receiver = notify_socket
    interval = watchdog_interval({"WATCHDOG_USEC": "200000"})
    assert interval == 0.1
    spy = SleepSpy()
    monkeypatch.setattr(sdnotify, "asyncio", spy)
    notifier = Notifier(path)
    probe = Probe()
    task = asyncio.create_task(watchdog_loop(notifier, interval, probe))
    try:
        await probe.until(lambda: len(probe.calls) >= 6, "six passes")
    finally:
        await _cancel(task)
        notifier.close()
    sent = probe.passed()
    # One ping per pass, and between passes a wait of exactly the interval: never more
    # often than systemd needs, never a deadline missed by asking for a longer sleep.
    assert len(await asyncio.to_thread(receiver.wait_count, "WATCHDOG=1", sent)) == sent
    assert spy.requested[: sent - 1] == [interval] * (sent - 1)
    # Measured on the loop's clock, passes are at least the interval apart (load only
    # stretches them).
    times = [at for at, _ in probe.calls]
    assert min(b - a for a, b in itertools.pairwise(times)) >= interval - 0.002, times


async def test_pings_stop_while_loop_is_blocked(
    notify_socket: tuple[str, DatagramReceiver],
) -> None:
    path, receiver = notify_socket
    notifier = Notifier(path)
    probe = Probe()
    task = asyncio.create_task(watchdog_loop(notifier, 0.05, probe))
    try:
        await probe.until(lambda: probe.passed() >= 3, "three pings")
        sent = probe.passed()
        # A stuck event loop: nothing on it runs. Still blocked, wait for every ping
        # sent so far to arrive, and well past the interval: no other ping may come.
        time.sleep(0.6)
        receiver.wait_count("WATCHDOG=1", sent)
        time.sleep(0.2)
        during = len(receiver.times_of("WATCHDOG=1"))
        # Once the loop runs again, so do the pings.
        await asyncio.to_thread(receiver.wait_count, "WATCHDOG=1", sent + 3)
    finally:
        await _cancel(task)
        notifier.close()
    assert during == sent, f"{during - sent} pings while the loop was blocked"


async def test_pings_withheld_when_liveness_fails(
    notify_socket: tuple[str, DatagramReceiver],
) -> None:
    path, receiver = notify_socket
    notifier = Notifier(path)
    heartbeat = Heartbeat()
    probe = Probe(heartbeat.fresh_within(0.2))
    task = asyncio.create_task(watchdog_loop(notifier, 0.05, probe))
    try:
        # Nobody beats: the heartbeat goes stale, and several passes then fail.
        await probe.until(
            lambda: [alive for _, alive in probe.calls[-3:]] == [False] * 3, "stale passes"
        )
        stale_passes = len(probe.calls)
        heartbeat.beat()
        await probe.until(lambda: probe.calls[-1][1], "a passing check after the beat")
        await probe.until(lambda: len(probe.calls) >= stale_passes + 3, "more passes")
    finally:
        await _cancel(task)
        notifier.close()
    # Exactly one ping per passing check: none while it failed, and they came back.
    sent = probe.passed()
    assert any(alive for _, alive in probe.calls[stale_passes:])
    assert len(await asyncio.to_thread(receiver.wait_count, "WATCHDOG=1", sent)) == sent
    await asyncio.sleep(0.2)  # a stray ping from a failed check would be in by now
    assert len(receiver.times_of("WATCHDOG=1")) == sent


def test_heartbeat_freshness() -> None:
    heartbeat = Heartbeat()
    assert heartbeat.fresh_within(3600)()
    time.sleep(0.05)
    assert not heartbeat.fresh_within(0.01)()  # at least 50 ms old
    heartbeat.beat()
    assert heartbeat.fresh_within(3600)() and heartbeat.age() < 3600


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

    passes = []

    def alive():
        passes.append(1)
        return True

    async def main():
        task = asyncio.create_task(watchdog_loop(notifier, watchdog_interval(), alive))
        while len(passes) < 3:  # three pings sent, however slow the machine
            await asyncio.sleep(0.01)
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
