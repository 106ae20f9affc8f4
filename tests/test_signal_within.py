"""`procinfo.signal_within`: `ftsup save` signals one process of a trainer's, and never
a process that is not (real processes, real signals)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ftsup.supervisor.procinfo import process_start_time, signal_within
from tests.supervisor_harness import wait_for

# A leader in its own group that starts a child in a session of its own (as torchrun
# starts its workers); the child records SIGUSR2 by exiting 42.
LEADER = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, sys, time\\n"
    "signal.signal(signal.SIGUSR2, lambda *a: sys.exit(42))\\n"
    "print('ready', flush=True)\\n"
    "time.sleep(600)\\n"], start_new_session=True, stdout=sys.stdout)
print(child.pid, flush=True)
sys.exit(child.wait())
"""


@pytest.fixture
def leader() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", LEADER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ready"
    try:
        yield proc, child
    finally:
        for pgid in (proc.pid, child):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        proc.wait(10)


def test_a_descendant_in_its_own_session_is_signalled(
    leader: tuple[subprocess.Popen[str], int],
) -> None:
    proc, child = leader
    start = process_start_time(proc.pid)
    assert signal_within(child, proc.pid, signal.SIGUSR2, leader_start_time=start)
    assert proc.wait(30) == 42  # the child got it and exited 42; the leader passed it on


def test_a_process_outside_the_trainer_is_never_signalled(
    leader: tuple[subprocess.Popen[str], int],
) -> None:
    proc, _child = leader
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        start = process_start_time(proc.pid)
        assert not signal_within(stranger.pid, proc.pid, signal.SIGUSR2, leader_start_time=start)
        time.sleep(0.2)
        assert stranger.poll() is None  # untouched
        # A leader replaced by another process (a recycled pid) vouches for nobody.
        assert not signal_within(
            _child, proc.pid, signal.SIGUSR2, leader_start_time=(start or 0) + 1
        )
        wait_for(lambda: proc.poll() is None, 5, 0.1, "the leader to live on")
    finally:
        stranger.kill()
        stranger.wait()
