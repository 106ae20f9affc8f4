"""A warm standby's warm-up runs at idle CPU and I/O priority; the trainer it becomes does not.

Real processes: the standby shim and `ftsup.trainer.standby` on the demo's tiny
model, a sleeping process standing in for the daemon. The kernel's view is
read from /proc (`policy`, field 41 of each thread's stat) and ioprio_get,
sampled while the standby warms and while the activated run trains. A thread
"trains" when its CPU time grows between two samples taken after the first
step. Run twice: as the test runs (root here: CAP_SYS_NICE) and without
CAP_SYS_NICE and with RLIMIT_NICE 0, where nothing can leave SCHED_IDLE.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ftsup.supervisor.atomicio import read_json
from ftsup.supervisor.contract import ENV_ATTEMPT, ENV_FAULT_STEP_DELAY, ENV_PROGRESS_FILE
from ftsup.supervisor.standby_shim import STANDBY_FILE
from ftsup.supervisor.trainer_launch import split_single_process_argv, standby_argv
from ftsup.trainer.demo import prepare_demo
from ftsup.trainer.standby import IOPRIO_CLASS_IDLE, io_class, sched_policy
from tests.supervisor_harness import activate_standby, start_standby_shim, wait_for

pytestmark = pytest.mark.slow  # trains real models: starts first (tests/conftest.py)

SCHED_OTHER, SCHED_IDLE = os.SCHED_OTHER, os.SCHED_IDLE
IDLE = (SCHED_IDLE, IOPRIO_CLASS_IDLE)  # what a warm-up thread must run at
LOWERED = {"scope": "warm-up thread", "cpu": "SCHED_IDLE", "io": "idle"}


def _unprivileged() -> list[str]:
    """A command prefix that runs without CAP_SYS_NICE and with RLIMIT_NICE 0."""
    drop = ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice"]
    return ["prlimit", "--nice=0:0", *(drop if os.geteuid() == 0 else [])]


def _may_leave_idle() -> bool:
    """Whether this test's own processes may leave SCHED_IDLE (as the 'as_is' case runs)."""
    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


@dataclass
class Sample:
    policy: int
    io: int
    cpu_ticks: int
    name: str  # for failure messages


@dataclass
class Threads:
    """Every sample of every thread of one process, in order."""

    pid: int
    samples: dict[int, list[Sample]] = field(default_factory=dict)

    def take(self) -> None:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
        except FileNotFoundError:
            return  # the process has ended
        for tid in tids:
            try:
                stat = Path(f"/proc/{self.pid}/task/{tid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                ticks = int(fields[11]) + int(fields[12])  # utime + stime
                name = Path(f"/proc/{self.pid}/task/{tid}/comm").read_text().strip()
                sample = Sample(sched_policy(tid, self.pid), io_class(tid), ticks, name)
            except OSError:
                continue  # the thread ended between listing and reading
            self.samples.setdefault(tid, []).append(sample)

    def working(self) -> dict[int, list[Sample]]:
        """Threads whose CPU time grew between samples: those samples (the later of each)."""
        grown: dict[int, list[Sample]] = {}
        for tid, samples in self.samples.items():
            for before, after in itertools.pairwise(samples):
                if after.cpu_ticks > before.cpu_ticks:
                    grown.setdefault(tid, []).append(after)
        return grown


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny model and data, built once for both cases."""
    return prepare_demo(tmp_path_factory.mktemp("priority") / "demo", steps=60, name="priority")


def _train_json(job: Path, output: Path) -> tuple[Path, list[str]]:
    """This case's train.json (its own output folder) and the cold trainer's argv."""
    from ftsup.supervisor.spec import load_spec
    from ftsup.supervisor.trainer_launch import build_trainer_argv, write_train_json

    spec = load_spec(job)
    assert spec.train is not None
    config = write_train_json(output.parent / "train.json", spec.train, output_dir=output)
    return config, build_trainer_argv(config, None, spec.launch, sys.executable)


@contextlib.contextmanager
def _reaped(shim: subprocess.Popen[bytes]) -> Iterator[list[int]]:
    """The shim's group and those added to the yielded list (the trainer's) end afterwards."""
    groups = [shim.pid]
    try:
        yield groups
    finally:
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        shim.wait()


def _activate_and_watch(
    shim: subprocess.Popen[bytes], folder: Path, cold: list[str], pid: int, tmp_path: Path
) -> Threads:
    """Activate the standby as the daemon would and sample its threads from the first
    step until the run ends; the run must finish."""
    progress = tmp_path / "progress.jsonl"
    env = {
        **os.environ,
        ENV_PROGRESS_FILE: str(progress),
        ENV_ATTEMPT: "1",
        ENV_FAULT_STEP_DELAY: "0.02",  # at least 1.2 s of training to watch
    }
    env.pop("OMP_NUM_THREADS", None)  # torch's own pool (one thread per core) is watched too
    trainer_args = (split_single_process_argv(cold) or ([], []))[1]
    activation = {"attempt": 1, "job": "priority", "args": trainer_args, "env": env}
    activate_standby(folder, tmp_path / "attempt-1", activation)
    training = Threads(pid)
    while shim.poll() is None:
        if progress.exists() and '"event": "step"' in progress.read_text():
            training.take()
        time.sleep(0.02)
    assert shim.wait() == 0
    assert (read_json(tmp_path / "attempt-1" / "exit.json") or {}).get("returncode") == 0
    records = [json.loads(line) for line in progress.read_text().splitlines()]
    assert any(r["event"] == "train_end" for r in records)
    assert (tmp_path / "out" / "checkpoint-60").is_dir()
    return training


def _assert_trained_at_normal_priority(training: Threads, pid: int) -> None:
    working = training.working()
    assert pid in working, "the main thread must be among the training threads"
    for tid, samples in working.items():
        assert all(s.policy == SCHED_OTHER for s in samples), (tid, samples)
        assert all(s.io != IOPRIO_CLASS_IDLE for s in samples), (tid, samples)


@pytest.mark.parametrize("privilege", ["as_is", "unprivileged"])
def test_warm_up_runs_idle_and_every_training_thread_runs_normal(
    tmp_path: Path,
    fake_daemon: subprocess.Popen[bytes],
    demo_job: Path,
    privilege: str,
) -> None:
    _config, cold = _train_json(demo_job, tmp_path / "out")
    prefix = _unprivileged() if privilege == "unprivileged" else []
    folder = tmp_path / "standby-1"
    argv = prefix + (standby_argv(cold) or [])
    shim = start_standby_shim(folder, tmp_path / "out", fake_daemon.pid, argv)
    with _reaped(shim) as groups:
        info = wait_for(lambda: read_json(folder / STANDBY_FILE), 60, what="standby.json")
        pid = info["trainer_pid"]
        groups.append(pid)  # the trainer has a process group of its own
        warming = Threads(pid)
        while (read_json(folder / STANDBY_FILE) or {}).get("state") != "ready":
            assert shim.poll() is None, "the standby shim ended while warming"
            warming.take()
            time.sleep(0.02)
        ready = read_json(folder / STANDBY_FILE) or {}
        assert ready.get("warm_priority") == LOWERED
        # What the imports built is out of the collector's sight: HF's gc.collect() at
        # the start of training walks only what the takeover adds (torch alone: >100k).
        assert ready.get("frozen_objects", 0) > 100_000, ready
        # The main thread (the future trainer) never left normal priority, and a
        # thread that did the warm-up's work ran at SCHED_IDLE in the idle I/O class.
        assert {(s.policy, s.io) for s in warming.samples[pid]} <= {(SCHED_OTHER, 0)}
        idle_workers = [
            tid
            for tid, samples in warming.working().items()
            if tid != pid and all((s.policy, s.io) == IDLE for s in samples)
        ]
        assert idle_workers, f"no idle thread did the warm-up's work: {warming.samples}"
        training = _activate_and_watch(shim, folder, cold, pid, tmp_path)

    _assert_trained_at_normal_priority(training, pid)
    if privilege == "as_is" and _may_leave_idle():  # takeover raised every leftover thread
        assert all(s[-1].policy == SCHED_OTHER for s in training.samples.values())


def test_a_standby_activated_while_warming_trains_at_normal_priority(
    tmp_path: Path, fake_daemon: subprocess.Popen[bytes], demo_job: Path
) -> None:
    """The activation arrives while the idle warm-up still runs: the trainer waits for
    it (raising it where allowed), then trains like any other."""
    _config, cold = _train_json(demo_job, tmp_path / "out")
    folder = tmp_path / "standby-1"
    argv = _unprivileged() + (standby_argv(cold) or [])
    shim = start_standby_shim(folder, tmp_path / "out", fake_daemon.pid, argv)
    with _reaped(shim) as groups:
        info = wait_for(lambda: read_json(folder / STANDBY_FILE), 60, what="standby.json")
        pid = info["trainer_pid"]
        groups.append(pid)
        warming = Threads(pid)

        def warm_up_running() -> bool:
            warming.take()
            return any(samples[-1].policy == SCHED_IDLE for samples in warming.samples.values())

        wait_for(warm_up_running, 60, 0.01, "the idle warm-up thread")
        training = _activate_and_watch(shim, folder, cold, pid, tmp_path)
    _assert_trained_at_normal_priority(training, pid)
