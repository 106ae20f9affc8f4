"""Goodput: the share of wall-clock time that turned into training progress.

Fed the progress lines of a job (live, or replayed after a daemon restart) and
the start times of its attempts, it splits the job's wall time into:

* productive: time between consecutive steps that reached new ground,
* checkpoint stall: the part of those intervals spent in a save
  (`checkpoint_start` -> `checkpoint_saved`, or the trainer's own `stall_s`),
  memory-tier snapshots included (their `stall_s`, also kept apart as
  `memory_stall_s`),
* recomputed: steps an attempt re-ran because they came after the checkpoint it
  resumed from,
* restart downtime: everything else — detection, backoff, start-up and loading
  up to an attempt's first step, and the work lost after its last step.

The four add up to the wall time by construction. Pure (no clock reads).

Only timed steps can be placed in the wall time. When a job's steps come
without times (a command whose only readable progress is its checkpoints'
`trainer_state.json`), or its progress source may give none (`untimed_source`),
and no timed step has been seen, the split is unknown, never "0% goodput": the
report says so (`unknown`: the reason) and leaves the parts out.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from ftsup.supervisor.contract import PROGRESS_MEMORY_SNAPSHOT


@dataclass(frozen=True)
class Goodput:
    wall_s: float
    productive_s: float
    checkpoint_stall_s: float
    recomputed_s: float
    restart_downtime_s: float
    unknown: str | None = None  # why the split cannot be known; None when it is
    memory_stall_s: float = 0.0  # the part of checkpoint_stall_s spent on memory snapshots
    memory_resumes: int = 0  # attempts that resumed a memory snapshot

    @property
    def ratio(self) -> float | None:
        if self.unknown is not None:
            return None
        return self.productive_s / self.wall_s if self.wall_s > 0 else None

    def to_json(self) -> dict[str, Any]:
        """The parts and the ratio; all null (with `unknown` saying why) when unknown."""
        known = self.unknown is None
        return {
            "wall_s": self.wall_s,
            "productive_s": self.productive_s if known else None,
            "checkpoint_stall_s": self.checkpoint_stall_s if known else None,
            "recomputed_s": self.recomputed_s if known else None,
            "restart_downtime_s": self.restart_downtime_s if known else None,
            "memory_stall_s": self.memory_stall_s if known else None,
            "memory_resumes": self.memory_resumes,
            "goodput": self.ratio,
            "unknown": self.unknown,
        }


class GoodputTracker:
    def __init__(self) -> None:
        self._attempt_starts: list[float] = []
        self._attempt: int | None = None
        self._prev_step_ts: float | None = None
        self._high_water = 0
        self._high_water_before = 0
        self._save_started: float | None = None
        self._steps_since_save_start = 0
        self._pending_stall = 0.0
        self._pending_memory = 0.0
        self.productive = 0.0
        self.stall = 0.0
        self.recomputed = 0.0
        self.memory_stall = 0.0
        self.memory_resumes = 0
        self.save_costs: deque[float] = deque(maxlen=50)
        self.step_intervals: deque[float] = deque(maxlen=200)
        self.timed_steps = 0
        self.untimed_steps = 0
        # Set by the follower when the job's progress may come without times.
        self.untimed_source: str | None = None

    def set_attempt_starts(self, starts: list[float]) -> None:
        """Start times of the job's attempts (records are attributed by their time)."""
        self._attempt_starts = sorted(starts)

    def feed(self, record: dict[str, Any]) -> None:
        ts = record.get("ts")
        event, step = record.get("event", "step"), record.get("step")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
            if event == "step" and isinstance(step, int) and not isinstance(step, bool):
                self.untimed_steps += 1
            return
        attempt = bisect.bisect_right(self._attempt_starts, ts)
        if attempt != self._attempt:
            self._attempt, self._prev_step_ts = attempt, None
            self._high_water_before = self._high_water
            self._save_started, self._pending_stall, self._pending_memory = None, 0.0, 0.0
        if event == "checkpoint_start":
            self._save_started, self._steps_since_save_start = ts, 0
        elif event == "checkpoint_saved":
            self._saved(ts, record.get("stall_s"))
        elif event == PROGRESS_MEMORY_SNAPSHOT:
            self._memory_snapshot(record.get("stall_s"))
        elif event == "train_start" and record.get("resumed_from_memory") is True:
            self.memory_resumes += 1
        elif event == "step" and isinstance(step, int) and not isinstance(step, bool):
            self.timed_steps += 1
            self._step(ts, step)

    def _saved(self, ts: float, reported_stall: Any) -> None:
        if isinstance(reported_stall, int | float) and not isinstance(reported_stall, bool):
            stall = max(0.0, float(reported_stall))  # an async save stalls less than it lasts
        elif self._save_started is not None:
            stall = max(0.0, ts - self._save_started)
        else:
            return
        self.save_costs.append(stall)
        if self._save_started is not None and self._steps_since_save_start > 0:
            # An asynchronous save reports after training went on: its stall sat in the
            # step interval that followed `checkpoint_start`, already counted as training.
            moved = min(stall, self.productive)
            self.productive -= moved
            self.stall += moved
        else:
            self._pending_stall += stall
        self._save_started = None

    def _memory_snapshot(self, reported_stall: Any) -> None:
        """A snapshot is reported once written, after training went on: its stall
        sat in a step interval already counted as training."""
        if not isinstance(reported_stall, int | float) or isinstance(reported_stall, bool):
            return
        stall = max(0.0, float(reported_stall))
        moved = min(stall, self.productive)
        self.productive -= moved
        self.stall += moved
        self.memory_stall += moved
        self._pending_stall += stall - moved  # before any counted interval: the next one's
        self._pending_memory += stall - moved

    def _step(self, ts: float, step: int) -> None:
        if self._prev_step_ts is not None:
            interval = max(0.0, ts - self._prev_step_ts)
            stall = min(self._pending_stall, interval)
            self.stall += stall
            self.memory_stall += min(self._pending_memory, stall)
            if step <= self._high_water_before:
                self.recomputed += interval - stall
            else:
                self.productive += interval - stall
                self.step_intervals.append(interval - stall)
        self._prev_step_ts, self._pending_stall, self._pending_memory = ts, 0.0, 0.0
        self._high_water = max(self._high_water, step)
        self._steps_since_save_start += 1

    def report(self, started_at: float, until: float) -> Goodput:
        wall = max(0.0, until - started_at)
        busy = self.productive + self.stall + self.recomputed
        return Goodput(
            wall,
            self.productive,
            self.stall,
            self.recomputed,
            max(0.0, wall - busy),
            unknown=self.unknown_reason(),
            memory_stall_s=self.memory_stall,
            memory_resumes=self.memory_resumes,
        )

    def unknown_reason(self) -> str | None:
        """Why the wall time cannot be split (no timed step yet), or None."""
        if self.timed_steps > 0:
            return None
        if self.untimed_steps > 0:
            return "the trainer's steps come without times (read from its checkpoints)"
        return self.untimed_source


def young_daly_interval(save_cost_s: float, mtbf_s: float) -> float:
    """The checkpoint interval that minimises expected waste: sqrt(2 * C * MTBF)."""
    return math.sqrt(2.0 * save_cost_s * mtbf_s)


def checkpoint_advice(
    tracker: GoodputTracker, *, wall_s: float, failures: int, configured_steps: int | None
) -> dict[str, Any] | None:
    """Young/Daly's interval next to the configured one, once there is data for both."""
    if not tracker.save_costs or not tracker.step_intervals or failures == 0:
        return None
    cost = statistics.median(tracker.save_costs)
    step_s = statistics.median(tracker.step_intervals)
    mtbf = wall_s / failures
    interval = young_daly_interval(cost, mtbf)
    return {
        "save_cost_s": cost,
        "mtbf_s": mtbf,
        "recommended_interval_s": interval,
        "recommended_steps": max(1, round(interval / step_s)) if step_s > 0 else None,
        "configured_steps": configured_steps,
        "configured_interval_s": configured_steps * step_s if configured_steps else None,
    }
