"""The runner under faults of its environment (issue 12): a shim killed under a
running trainer, checkpoints that cannot be read for now, a state disk that
refuses the runner's own files. Real daemons, shims, trainers and signals."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.daemon import runner as runner_module
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.diagnose import classify_attempt
from ftsup.supervisor.daemon.exitwatch import wait_for_exit
from ftsup.supervisor.daemon.launcher import default_env
from ftsup.supervisor.daemon.runner import JobRunner
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.procinfo import group_members, is_same_process, process_start_time
from ftsup.supervisor.resume import CheckpointsUncheckable, ResumePoint
from ftsup.supervisor.spec import parse_spec
from ftsup.supervisor.spec_types import JobSpec
from ftsup.supervisor.store import Store
from tests.disks import tmpfs
from tests.supervisor_harness import TOY_TRAINER, Harness, wait_for

MAX_STEPS = 3000  # a minute of training at 0.02 s a step: far beyond any stop


def _events(harness: Harness, job: str) -> list[dict[str, Any]]:
    return list(harness.cli_json("events", job)["events"])


@pytest.mark.parametrize(
    ("trainer_args", "how"),
    [
        ((), "saves and exits on SIGTERM"),
        (("--ignore-term", "--spawn-child"), "ignores SIGTERM: SIGKILL after stop_grace"),
    ],
)
def test_graceful_stop_after_the_shim_died_stops_the_trainer(
    daemon: Harness, trainer_args: tuple[str, ...], how: str
) -> None:
    """Defect 8: `stop` used to signal only the dead shim; the trainer trained on to
    its natural end and the run was recorded `stopped on request`."""
    job = daemon.toy_job(
        "orphan",
        "--max-steps",
        str(MAX_STEPS),
        "--step-time",
        "0.02",
        *trainer_args,
        restart='stop_grace = "1s"',
    )
    daemon.cli("start", str(job))
    wait_for(lambda: daemon.status("orphan")["progress"]["step"] >= 3, what="step 3")
    pids = daemon.attempt_pids("orphan")[0]
    os.kill(pids["shim_pid"], signal.SIGKILL)
    wait_for(
        lambda: any("shim lost" in e["message"] for e in _events(daemon, "orphan")),
        what="the daemon to notice the lost shim",
    )
    assert is_same_process(pids["trainer_pid"], pids["trainer_start"])

    daemon.cli("stop", "orphan")
    # No time limit is asserted: before the fix the run trained on to MAX_STEPS and
    # was then recorded `stopped`, which the step assertions below catch.
    status = daemon.wait_state("orphan", "stopped", "finished", "gave_up", "failed", timeout=300)
    assert status["state"] == "stopped", status
    # The trainer was stopped, not left to train to its end ...
    last = status["attempt_history"][-1]
    assert last["stop_requested"] and last["last_step"] < MAX_STEPS, (how, last)
    assert daemon.steps("orphan")[-1] < MAX_STEPS
    assert not (daemon.work / "orphan" / "final.json").exists()
    # ... and nothing of its process group is left.
    assert not is_same_process(pids["trainer_pid"], pids["trainer_start"])
    wait_for(lambda: not group_members(pids["pgid"]), 10, what="the process group to be gone")


# ------------------------------------------------- checkpoints that cannot be checked


class _FlakySelection:
    """Checkpoint selection that cannot read the checkpoints twice (as under EMFILE),
    then can: what `manager.select_resume` raises when an OSError stops it."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, spec: JobSpec) -> ResumePoint:
        self.calls += 1
        if self.calls <= self.failures:
            raise CheckpointsUncheckable(
                f"{spec.output_dir}/checkpoint-5/optimizer.pt: [Errno 24] Too many open files"
            )
        return ResumePoint(None, 0)


def _toy_spec(folder: Path, name: str) -> JobSpec:
    output = folder / "out"
    argv = [sys.executable, str(TOY_TRAINER), "--output-dir", str(output), "--max-steps", "3"]
    text = (
        f'[job]\nname = "{name}"\noutput_dir = "{output}"\n\n[command]\nargv = {argv!r}\n'.replace(
            "'", '"'
        )
    )
    return parse_spec(text, folder / "job.toml")


def test_uncheckable_checkpoints_make_the_launch_wait_not_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 2 (runner side): "could not check" used to escape `_launch` and end the
    job `failed: internal error`; it must wait with an event and launch once readable."""
    monkeypatch.setattr(runner_module, "PREFLIGHT_RETRY", 0.05)  # the retry period only
    layout = Layout(state_dir=tmp_path / "state", runtime_dir=tmp_path / "rt")
    store = Store(layout.db)
    bus = EventBus(store)
    seen: list[dict[str, Any]] = []
    bus.add_listener(seen.append)
    spec = _toy_spec(tmp_path, "flaky")
    _register(store, spec)
    selection = _FlakySelection(failures=2)
    try:
        asyncio.run(_supervise(spec, store, bus, layout, selection))
    finally:
        _kill_attempts(layout, spec.name)
    kinds = [e["kind"] for e in seen if e["kind"] != "state"]
    waits = [e for e in seen if e["kind"] == "launch_wait"]
    assert len(waits) == 2, kinds
    assert all("Too many open files" in e["message"] for e in waits)
    assert kinds.index("attempt_started") > kinds.index("launch_wait")
    assert selection.calls == 3
    job = store.get_job(spec.name)
    assert job is not None and job.state == "finished", (job, kinds)
    assert (spec.output_dir / "final.json").exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk") as disk:
        yield disk


def test_full_state_disk_at_launch_waits_and_launches_when_space_returns(
    tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 3 (runner side): a full state disk at launch (the attempt's command.json)
    used to end the job `failed: cannot start the shim: [Errno 28]`, for good."""
    monkeypatch.setattr(runner_module, "PREFLIGHT_RETRY", 0.05)  # the retry period only
    layout = Layout(state_dir=small_disk / "state", runtime_dir=tmp_path / "rt")
    layout.run_dir("full").mkdir(parents=True)
    store = Store(tmp_path / "db" / "ftsup.db")  # the database is not what this is about
    bus = EventBus(store)
    seen: list[dict[str, Any]] = []
    filler = small_disk / "filler"

    def listen(event: dict[str, Any]) -> None:
        seen.append(event)
        if event["kind"] == "launch_wait" and filler.exists():
            filler.unlink()  # space returns while the launch waits

    bus.add_listener(listen)
    spec = _toy_spec(tmp_path, "full")
    _register(store, spec)
    with filler.open("wb", buffering=0) as fill, contextlib.suppress(OSError):
        while True:
            fill.write(b"\0" * 4096)
    try:
        asyncio.run(_supervise(spec, store, bus, layout, lambda _spec: ResumePoint(None, 0)))
    finally:
        _kill_attempts(layout, spec.name)
    kinds = [e["kind"] for e in seen if e["kind"] != "state"]
    waits = [e for e in seen if e["kind"] == "launch_wait"]
    assert waits and "No space left on device" in waits[0]["message"], kinds
    job = store.get_job(spec.name)
    assert job is not None and job.state == "finished", (job, kinds)
    attempts = store.current_attempts(spec.name)
    assert [(a.n, a.returncode) for a in attempts] == [(1, 0)]
    assert (spec.output_dir / "final.json").exists()


def _register(store: Store, spec: JobSpec) -> None:
    store.upsert_job(
        name=spec.name,
        spec_path=str(spec.source),
        spec_text=spec.text,
        kind="command",
        output_dir=str(spec.output_dir),
        state="pending",
        accept_drift=False,
    )


async def _supervise(
    spec: JobSpec,
    store: Store,
    bus: EventBus,
    layout: Layout,
    select: Callable[[JobSpec], ResumePoint],
) -> None:
    """One real JobRunner, to the end of its job."""
    runner = JobRunner(
        spec,
        store=store,
        bus=bus,
        layout=layout,
        select_resume=select,
        classify=classify_attempt,
        env=default_env(),
    )
    runner.start()
    assert runner.task is not None
    await asyncio.wait_for(runner.task, timeout=120)


def _kill_attempts(layout: Layout, job: str) -> None:
    """Whatever a failed test left running: every shim and trainer group of `job`."""
    for pids_file in layout.run_dir(job).glob("attempt-*/pids.json"):
        pids = json.loads(pids_file.read_text())
        if is_same_process(pids["shim_pid"], pids["shim_start"]):
            os.kill(pids["shim_pid"], signal.SIGKILL)
        if group_members(pids["pgid"]):
            os.killpg(pids["pgid"], signal.SIGKILL)


def test_exit_watch_without_descriptors_falls_back_to_polling() -> None:
    """Descriptor exhaustion (defect 2's environment): `pidfd_open` failing with EMFILE
    used to raise out of the runner's wait and end the job `failed: internal error`."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    start = process_start_time(child.pid)
    loop = asyncio.new_event_loop()  # its descriptors, before there are none left
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        with pytest.raises(OSError) as exhausted:
            os.pidfd_open(child.pid)
        assert exhausted.value.errno == errno.EMFILE
        loop.run_until_complete(asyncio.wait_for(wait_for_exit(child.pid, start, child), 60))
        assert child.returncode == 0
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        loop.close()
        if child.poll() is None:
            child.kill()
            child.wait()
