"""Processes a trainer starts in sessions of their own (as torchrun starts its workers)
end with the attempt: the shim is their subreaper (real daemon, shim, processes)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

from ftsup.supervisor.procinfo import process_start_time
from tests.supervisor_harness import Harness, wait_for

# Starts a worker in a new session, records its pid, then exits 1 (a crashed launcher).
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen(["sleep", "600"], start_new_session=True)
open(sys.argv[1], "w").write(str(worker.pid))
time.sleep(float(sys.argv[2]))
sys.exit(1)
"""


def write_job(harness: Harness, name: str, seconds: float) -> tuple[Path, Path]:
    script = harness.work / "launcher.py"
    script.write_text(LAUNCHER)
    pid_file = harness.work / f"{name}.pid"
    argv = [sys.executable, str(script), str(pid_file), str(seconds)]
    job = harness.work / f"{name}.toml"
    job.write_text(
        textwrap.dedent(f"""\
        [job]
        name = "{name}"
        output_dir = "{harness.work / name}"

        [command]
        argv = {json.dumps(argv)}
        instrument = false

        [restart]
        max_restarts = 0
        """)
    )
    return job, pid_file


@contextlib.contextmanager
def started_worker(daemon: Harness, name: str, seconds: float) -> Iterator[Callable[[], bool]]:
    """Start the job; yield "is the worker still alive?"; never leave the worker behind."""
    job, pid_file = write_job(daemon, name, seconds)
    daemon.cli("start", str(job))
    wait_for(pid_file.exists, 30, 0.05, "the worker to start")
    worker = int(pid_file.read_text())
    start = process_start_time(worker)

    def alive() -> bool:
        return process_start_time(worker) == start

    try:
        yield alive
    finally:
        if alive():
            os.kill(worker, signal.SIGKILL)


def test_a_worker_in_its_own_session_ends_with_its_crashed_launcher(daemon: Harness) -> None:
    with started_worker(daemon, "orphaning", 1.0) as alive:
        daemon.wait_state("orphaning", "gave_up", "failed")
        # Once the attempt is over, the worker is gone (not left to init).
        wait_for(lambda: not alive(), 10, 0.05, "the worker to end")


def test_a_stop_waits_for_the_worker_and_then_ends_it(daemon: Harness) -> None:
    with started_worker(daemon, "stopping", 600.0) as alive:
        daemon.cli("stop", "stopping")
        daemon.wait_state("stopping", "stopped")
        assert not alive()
