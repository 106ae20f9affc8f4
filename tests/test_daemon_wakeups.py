"""The pump reads a job's files when they change, and sleeps otherwise (issue 15).

A real JobManager (real store, real run folders, real inotify) in this process:
what distinguishes the event-driven pump from the old 200 ms poll is that an
idle pump waits with no timeout at all (only an event can wake it) and does no
read while it waits, yet a line appended to a progress file is read. The wake-up
rate of a whole daemon under load is measured by bench/daemon_load.py, not
here: a rate is a wall-clock number.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.manager import JobManager
from ftsup.supervisor.daemon.runner import JobRunner
from ftsup.supervisor.daemon.wakeups import FolderWatch
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.spec import parse_spec
from ftsup.supervisor.store import Store


async def until(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Let the loop run until `predicate()` holds (the timeout only ends a broken test)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[JobManager]:
    layout = Layout(tmp_path / "state", tmp_path / "rt")
    store = Store(layout.db)
    manager = JobManager(store, EventBus(store), layout, env={})
    try:
        yield manager
    finally:
        await manager.close()
        store.close()


def queued_runner(manager: JobManager, name: str) -> JobRunner:
    """A job the daemon knows but does not run (a queued one): its runner, not started."""
    output = manager.layout.state_dir.parent / "out" / name
    text = (
        f'[job]\nname = "{name}"\noutput_dir = "{output}"\n\n'
        f'[command]\nargv = ["{sys.executable}", "-c", "pass"]\n'
    )
    manager.layout.run_dir(name).mkdir(parents=True, exist_ok=True)
    return manager._runner(parse_spec(text, manager.layout.state_dir / f"{name}.toml"))


def append_step(manager: JobManager, name: str, step: int) -> None:
    line = {"ts": time.time(), "event": "step", "step": step, "max_steps": 100, "loss": 1.0}
    with manager.layout.progress_file(name).open("a") as out:
        out.write(json.dumps(line) + "\n")


async def test_an_idle_pump_waits_for_an_event_and_reads_what_a_trainer_appends(
    manager: JobManager,
) -> None:
    runners = [queued_runner(manager, f"q{i}") for i in range(3)]
    manager.start_pump()
    wakeups = manager.wakeups
    assert wakeups.watch is not None and not wakeups.polling  # inotify, not the fallback
    # The first read of each job, including the one read of its output folder that a
    # job without an attempt gets; then nothing is left to come back for.
    await until(
        lambda: (
            wakeups.waiting_without_timeout and not any(r.follower.reads_pending for r in runners)
        ),
        "the pump to sleep",
    )
    reads = wakeups.reads
    await asyncio.sleep(1.0)  # the old pump read all three five times in this second
    assert wakeups.waiting_without_timeout
    assert wakeups.reads == reads

    append_step(manager, "q1", 7)
    await until(lambda: runners[1].progress.step == 7, "the appended step to be read")
    assert runners[0].progress.step == 0 and runners[2].progress.step == 0
    # Only the job whose file changed was read.
    assert wakeups.reads - reads == 1


async def test_without_inotify_the_pump_polls_and_says_so_once(
    manager: JobManager, caplog: pytest.LogCaptureFixture
) -> None:
    runner = queued_runner(manager, "p")
    manager.start_pump()
    await until(lambda: manager.wakeups.waiting_without_timeout, "the pump to sleep")
    with caplog.at_level(logging.WARNING, logger="ftsup.daemon"):
        manager.wakeups.fall_back("inotify_add_watch: No space left on device")
        manager.wakeups.fall_back("again")
    assert manager.wakeups.watch is None
    append_step(manager, "p", 3)
    await until(lambda: runner.progress.step == 3, "the step to be read by polling")
    warnings = [r for r in caplog.records if "polled every" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()


async def test_a_folder_watch_names_the_key_whose_folder_changed(tmp_path: Path) -> None:
    changed: list[set[str]] = []
    watch = FolderWatch(changed.append)
    try:
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        watch.watch("job-a", a)
        watch.watch("job-b", b)
        watch.listen(True)
        (b / "progress.jsonl").write_text("{}\n")
        await until(lambda: changed, "an inotify event")
        assert set().union(*changed) == {"job-b"}
        os.rmdir(a)  # the kernel drops the watch of a removed folder: so does the map
        await until(lambda: not watch.watching("job-a"), "the removed folder to be forgotten")
        assert watch.watching("job-b") == {b}
    finally:
        watch.close()
