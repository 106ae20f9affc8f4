"""What a job's trainer is doing, read from the files it writes.

Each pump reads the new progress lines (or, for a command that writes none, its
newest `trainer_state.json`) and log lines, and folds them into: the progress
state, the goodput account, the hang detector and the loss watch. It decides
nothing about the run: it reports what it saw (`Observations`) and the runner
acts. Lines an earlier attempt wrote (replayed after a daemon restart) count for
history and goodput, never as the current attempt's progress.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftsup.supervisor.checkpoints.discovery import list_checkpoints
from ftsup.supervisor.daemon.loss_watch import Emit, LossWatch
from ftsup.supervisor.follow import LineFollower
from ftsup.supervisor.goodput import GoodputTracker
from ftsup.supervisor.health.hang import HangDetector, HangPolicy, HangVerdict
from ftsup.supervisor.health.loss import Anomaly
from ftsup.supervisor.progress import JsonlFollower, ProgressState, records_from_trainer_state
from ftsup.supervisor.spec_types import JobSpec

LOG_RING = 500


@dataclass
class Observations:
    records: list[dict[str, Any]] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)
    saved_steps: list[int] = field(default_factory=list)  # checkpoint_saved, current attempt
    anomaly: Anomaly | None = None


class RunFollower:
    def __init__(self, spec: JobSpec, progress_file: Path, emit: Emit) -> None:
        self.spec = spec
        self.progress = ProgressState()
        self.goodput = GoodputTracker()
        self.loss_watch = LossWatch(spec.health, emit)
        self.log_ring: deque[str] = deque(maxlen=LOG_RING)
        self._progress_file = JsonlFollower(progress_file)
        self._log: LineFollower | None = None
        self._hang: HangDetector | None = None
        self._attempt_started_at: float | None = None
        self._progress_seen = False
        self._trainer_state_mtime = 0.0

    def begin_attempt(
        self, attempt_dir: Path, started_at: float, start_step: int, log_file: str
    ) -> None:
        self._attempt_started_at = started_at
        self.progress.begin_attempt(started_at, start_step)
        self.loss_watch.begin_attempt(start_step)
        # Monotonic clock from here on: an adopted attempt gets a fresh start-up allowance.
        self._hang = HangDetector(
            HangPolicy.from_spec(self.spec.health), started_at=time.monotonic()
        )
        self._log = LineFollower(attempt_dir / log_file)

    def end_attempt(self) -> None:
        self._hang = None
        self._attempt_started_at = None

    def hung(self) -> HangVerdict | None:
        return self._hang.is_hung(time.monotonic()) if self._hang is not None else None

    # reading --------------------------------------------------------------
    def read(self) -> Observations:
        seen = Observations()
        records = self._progress_file.read_new()
        if records:
            self._progress_seen = True
        elif not self._progress_seen and self.spec.command is not None:
            records = self._trainer_state_records()
        for record in records:
            self._fold(record, seen)
        seen.records = records
        if self._log is not None:
            seen.log_lines = [ln.decode(errors="replace") for ln in self._log.read_lines()]
            if seen.log_lines:
                self.log_ring.extend(seen.log_lines)
                if not self._progress_seen and self._hang is not None:
                    self._hang.heartbeat(time.monotonic())  # output is all a command shows
        return seen

    def _fold(self, record: dict[str, Any], seen: Observations) -> None:
        self.progress.apply(record)
        self.goodput.feed(record)
        current = self._of_current_attempt(record)
        event, step, loss = record.get("event", "step"), record.get("step"), record.get("loss")
        if current:
            self._feed_hang_detector(event, step)
            if event == "checkpoint_saved" and isinstance(step, int):
                seen.saved_steps.append(step)
        if event != "step" or not isinstance(step, int) or not isinstance(loss, int | float):
            return
        if not current:
            self.loss_watch.remember(step, float(loss))
            return
        anomaly = self.loss_watch.observe(step, float(loss))
        if anomaly is not None and seen.anomaly is None:
            seen.anomaly = anomaly

    def _of_current_attempt(self, record: dict[str, Any]) -> bool:
        started, ts = self._attempt_started_at, record.get("ts")
        if started is None:
            return False
        return not (isinstance(ts, int | float) and ts < started)

    def _feed_hang_detector(self, event: str, step: Any) -> None:
        detector = self._hang
        if detector is None:
            return
        now = time.monotonic()
        if event == "step" and isinstance(step, int):
            detector.step(step, now)
        elif event == "checkpoint_start":
            detector.checkpoint_started(now)
        elif event == "checkpoint_saved":
            detector.checkpoint_finished(now)
        else:
            detector.heartbeat(now)

    def _trainer_state_records(self) -> list[dict[str, Any]]:
        """For commands that write no progress.jsonl: the newest checkpoint's log_history."""
        found = list_checkpoints(self.spec.output_dir)  # by step, quarantined ones excluded
        if not found:
            return []
        newest = found[-1]
        state_file = newest / "trainer_state.json"
        try:
            mtime = state_file.stat().st_mtime
        except FileNotFoundError:
            return []
        if mtime <= self._trainer_state_mtime:
            return []
        self._trainer_state_mtime = mtime
        return [
            r
            for r in records_from_trainer_state(state_file)
            if r.get("event") != "step" or r.get("step", 0) > self.progress.step
        ]
