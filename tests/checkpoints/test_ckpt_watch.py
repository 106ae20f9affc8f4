"""The watcher reports a checkpoint only once its writer has finished it."""

from __future__ import annotations

import errno
import os
import queue
import shutil
import time
from pathlib import Path

import pytest
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter

from ftsup.supervisor.checkpoints.quarantine import quarantine
from ftsup.supervisor.checkpoints.report import CheckpointReport
from ftsup.supervisor.checkpoints.watch import CheckpointWatcher
from ftsup.supervisor.manifest import MANIFEST_NAME

SETTLE = 0.3
POLL = 0.1
# the HF Trainer's order: trainer_state.json last
ORDER = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
)


class Reports:
    """A thread-safe sink, as the daemon's call_soon_threadsafe would be."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[float, CheckpointReport]] = queue.Queue()
        self.problems: queue.Queue[str] = queue.Queue()

    def __call__(self, report: CheckpointReport) -> None:
        self.queue.put((time.monotonic(), report))

    def get(self, timeout: float = 60.0) -> tuple[float, CheckpointReport]:
        return self.queue.get(timeout=timeout)

    def assert_none(self, wait: float) -> None:
        with pytest.raises(queue.Empty):
            self.queue.get(timeout=wait)


def _write_in_steps(source: Path, target: Path, names: tuple[str, ...], pause: float) -> float:
    """Copy file by file, pausing between; the monotonic time of the last write."""
    target.mkdir()
    for name in names:
        shutil.copy(source / name, target / name)
        time.sleep(pause)
    return time.monotonic() - pause


@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_checkpoint_reported_only_when_finished(
    pristine: dict[str, Path], tmp_path: Path, mode: str
) -> None:
    out = tmp_path / "out"
    reports = Reports()
    with CheckpointWatcher(out, reports, mode=mode, settle=SETTLE, poll_interval=POLL) as watcher:  # type: ignore[arg-type]
        assert watcher.active_mode == mode
        # every file but the marker, then a pause longer than the settle time
        _write_in_steps(pristine["hf"] / "checkpoint-2", out / "checkpoint-2", ORDER[:-1], 0.02)
        reports.assert_none(SETTLE * 3)
        before_marker = time.monotonic()
        shutil.copy(pristine["hf"] / "checkpoint-2" / ORDER[-1], out / "checkpoint-2" / ORDER[-1])
        seen_at, report = reports.get()
        # The marker's write came after `before_marker`, and the watcher waits `settle`
        # without writes after it: a lower bound, which a loaded machine only raises.
        assert seen_at - before_marker >= SETTLE
        assert report.path == out / "checkpoint-2" and report.step == 2
        assert report.valid and report.resumable
        reports.assert_none(SETTLE * 2)  # once


def test_invalid_checkpoint_is_reported_with_its_reason(
    pristine: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    reports = Reports()
    with CheckpointWatcher(out, reports, settle=SETTLE):
        names = tuple(n for n in ORDER if n != "optimizer.pt")
        _write_in_steps(pristine["hf"] / "checkpoint-4", out / "checkpoint-4", names, 0.01)
        _, report = reports.get()
        assert not report.valid and report.reason == "optimizer.pt missing"


def _seal(source: Path, folder: Path) -> None:
    """Write the manifest as the trainer does: to a temporary name, then renamed."""
    tmp = folder / f"{MANIFEST_NAME}.tmp-1"
    shutil.copy(source / MANIFEST_NAME, tmp)
    os.replace(tmp, folder / MANIFEST_NAME)


def test_manifest_marks_the_end_however_long_hashing_takes(
    pristine: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    reports = Reports()
    source = pristine["ftsup"] / "checkpoint-6"
    with CheckpointWatcher(out, reports, settle=SETTLE, require_manifest=True):
        _write_in_steps(source, out / "checkpoint-6", ORDER, 0.01)
        reports.assert_none(SETTLE * 3)  # trainer_state.json is there, the manifest not yet
        _seal(source, out / "checkpoint-6")
        _, report = reports.get()
        assert report.format == "ftsup" and report.valid and report.step == 6


def test_a_manifest_is_reported_without_the_settle_wait(
    pristine: dict[str, Path], tmp_path: Path
) -> None:
    """With an hour of settle time, a report that comes at all did not wait for it."""
    out = tmp_path / "out"
    reports = Reports()
    source = pristine["ftsup"] / "checkpoint-6"
    with CheckpointWatcher(out, reports, settle=3600, require_manifest=True):
        _write_in_steps(source, out / "checkpoint-6", ORDER, 0.01)
        _seal(source, out / "checkpoint-6")
        _, report = reports.get()
        assert report.format == "ftsup" and report.valid and report.step == 6


def test_quarantined_and_existing_folders_are_not_reported(
    pristine: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(pristine["hf"], out)
    reports = Reports()
    with CheckpointWatcher(out, reports, settle=SETTLE):
        quarantine(out / "checkpoint-6", "test")
        reports.assert_none(SETTLE * 3)
    existing = Reports()
    with CheckpointWatcher(out, existing, settle=SETTLE, report_existing=True):
        steps = sorted(existing.get()[1].step or 0 for _ in range(2))
        assert steps == [2, 4]


class _LimitedEmitter(InotifyEmitter):
    """Fails like inotify_add_watch does when fs.inotify.max_user_watches is spent."""

    def on_thread_start(self) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")


class _LimitedObserver(BaseObserver):
    def __init__(self) -> None:
        super().__init__(_LimitedEmitter)


def test_inotify_limit_falls_back_to_polling(pristine: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    reports = Reports()
    watcher = CheckpointWatcher(
        out,
        reports,
        on_problem=reports.problems.put,
        settle=SETTLE,
        poll_interval=POLL,
        observer_factory=_LimitedObserver,
    )
    with watcher:
        assert watcher.active_mode == "polling"
        problem = reports.problems.get(timeout=30)
        assert "inotify watch limit reached" in problem and "polling" in problem
        _write_in_steps(pristine["hf"] / "checkpoint-2", out / "checkpoint-2", ORDER, 0.01)
        _, report = reports.get()
        assert report.valid and report.step == 2
    assert watcher.active_mode == "stopped"


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CheckpointWatcher(tmp_path, print, mode="fanotify")  # type: ignore[arg-type]
