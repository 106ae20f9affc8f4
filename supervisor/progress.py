"""Following a run's progress: `progress.jsonl` lines, or HF `trainer_state.json`.

The built-in trainer (and any script using `FtsupCallback`) appends JSON lines
to `progress.jsonl`. Other HF-style trainers don't, so for them the newest
checkpoint's `trainer_state.json` `log_history` is the source. Either way the
daemon keeps one `ProgressState` per job; rates and ETA count only the steps
since the current attempt started, so a restart does not distort them.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import PROGRESS_MEMORY_SNAPSHOT
from ftsup.supervisor.follow import LineFollower
from ftsup.supervisor.userfiles import NotRegularFile, open_binary

MAX_COUNT = 2**53  # steps fit a double exactly, SQLite's INTEGER and JSON readers
_COUNTS = ("step", "max_steps")
_TIMES = ("ts", "stall_s")
_FINITE = ("lr", "tokens_per_s", "epoch")
# NaN and inf here are what the loss watch looks for: kept, never a bad line.
_SIGNALS = ("loss", "eval_loss", "grad_norm")
_MAX_STATE_BYTES = 256 << 20


def check_record(record: dict[str, Any]) -> str | None:
    """Why a progress line cannot be used (a number out of range), or None.

    One trainer's bad line (a step of 2**70, `1e999`, a NaN step, an infinite
    max_steps) must never end supervision: the follower skips it with a warning.
    Fields that are not numbers at all are ignored by `apply`, as before.
    """
    event = record.get("event", "step")
    if not isinstance(event, str):
        return f"event {event!r} is not a string"
    for key in (*_COUNTS, *_TIMES, *_FINITE, *_SIGNALS):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        problem = _check_number(key, value)
        if problem is not None:
            return problem
    return None


def _check_number(key: str, value: int | float) -> str | None:
    if key in _SIGNALS:
        if isinstance(value, int) and abs(value) > MAX_COUNT:
            return f"{key} {_short(value)} is out of range"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} {value!r} is not a finite number"
    if key in _COUNTS:
        if isinstance(value, float) and not value.is_integer():
            return f"{key} {value!r} is not a whole number"
        if not 0 <= value <= MAX_COUNT:
            return f"{key} {_short(value)} is out of range (0 to 2^53)"
        return None
    low, high = (0, MAX_COUNT) if key in _TIMES else (-MAX_COUNT, MAX_COUNT)
    if not low <= value <= high:
        return f"{key} {_short(value)} is out of range"
    return None


def _short(value: int | float) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


@dataclass
class ProgressState:
    step: int = 0
    max_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    epoch: float | None = None
    last_update: float | None = None  # wall time of the newest line
    attempt_start_step: int | None = None
    attempt_start_time: float | None = None
    attempt_max_step: int = 0  # highest step reached by the current attempt itself
    last_checkpoint_step: int | None = None
    last_checkpoint_time: float | None = None
    # The newest memory-tier snapshot the trainer reported (issue 18), as reported.
    memory: dict[str, Any] | None = None
    # (time, step) samples of the current attempt, bounded, for the rate.
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))

    def begin_attempt(self, now: float, start_step: int) -> None:
        self.attempt_start_step = start_step
        self.attempt_start_time = now
        self.attempt_max_step = start_step
        self.samples.clear()

    def steps_per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        if t1 <= t0 or s1 <= s0:
            return None
        return (s1 - s0) / (t1 - t0)

    def eta_s(self) -> float | None:
        rate = self.steps_per_s()
        if rate is None or not self.max_steps or self.max_steps <= 0:
            return None
        return max(0.0, (self.max_steps - self.step) / rate)

    def apply(self, record: dict[str, Any]) -> None:
        """Fold one progress line into the state (unknown fields are ignored)."""
        ts = _number(record.get("ts"))
        if ts is not None:
            self.last_update = ts
        event = record.get("event", "step")
        step = _number(record.get("step"))
        if record.get("max_steps") is not None:
            max_steps = _number(record.get("max_steps"))
            self.max_steps = int(max_steps) if max_steps is not None else self.max_steps
        if event in ("step", "checkpoint_saved") and step is not None:
            self._count_for_attempt(int(step), ts)
        if event == "checkpoint_saved":
            self.last_checkpoint_step = int(step) if step is not None else None
            self.last_checkpoint_time = ts
            if step is not None and step > self.step:
                self.step = int(step)  # a checkpoint at N proves the run reached N
            return
        if event == "eval":
            self.eval_loss = _number(record.get("eval_loss"))
            return
        if event == PROGRESS_MEMORY_SNAPSHOT:
            self.memory = {
                key: record.get(key)
                for key in ("step", "bytes", "stall_s", "paced", "error")
                if record.get(key) is not None
            }
            return
        if step is not None and event in ("step", "train_start", "train_end", "heartbeat"):
            self.step = int(step)
            if ts is not None and event == "step":
                self.samples.append((ts, self.step))
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "epoch"):
            if key in record:
                setattr(self, key, _number(record[key]))

    def _count_for_attempt(self, step: int, ts: float | None) -> None:
        # Lines replayed from earlier attempts (after a daemon restart) are older
        # than the current attempt and must not count as its progress.
        if self.attempt_start_time is not None and ts is not None and ts < self.attempt_start_time:
            return
        self.attempt_max_step = max(self.attempt_max_step, step)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "max_steps": self.max_steps,
            "loss": self.loss,
            "eval_loss": self.eval_loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens_per_s": self.tokens_per_s,
            "epoch": self.epoch,
            "steps_per_s": self.steps_per_s(),
            "eta_s": self.eta_s(),
            "last_update": self.last_update,
            "last_checkpoint_step": self.last_checkpoint_step,
            "last_checkpoint_time": self.last_checkpoint_time,
            "memory": self.memory,
        }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if not isinstance(value, int) else value


class JsonlFollower:
    """The JSON objects appended to a JSONL file since the last call."""

    def __init__(self, path: Path) -> None:
        self._lines = LineFollower(path)

    def read_new(self) -> list[dict[str, Any]]:
        records = []
        for line in self._lines.read_lines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def records_from_trainer_state(path: Path) -> list[dict[str, Any]]:
    """Progress records from an HF `trainer_state.json` (for jobs without progress.jsonl).

    The file is the user's: opened without blocking (a FIFO raises
    `userfiles.NotRegularFile`) and read in the caller's worker thread.
    """
    try:
        with open_binary(path, follow=True) as handle:
            mtime = os.fstat(handle.fileno()).st_mtime
            raw = handle.read(_MAX_STATE_BYTES)
        state = json.loads(raw)
    except (OSError, NotRegularFile, ValueError, RecursionError):
        return []
    if not isinstance(state, dict):
        return []
    max_steps = state.get("max_steps")
    records: list[dict[str, Any]] = []
    for entry in state.get("log_history") or []:
        if not isinstance(entry, dict) or "step" not in entry:
            continue
        if "eval_loss" in entry:
            records.append(
                {"event": "eval", "step": entry["step"], "eval_loss": entry["eval_loss"]}
            )
        elif "loss" in entry:
            loss = entry.get("loss")
            records.append(
                {
                    "event": "step",
                    "step": entry["step"],
                    "max_steps": max_steps,
                    "loss": loss,
                    "lr": entry.get("learning_rate"),
                    "grad_norm": entry.get("grad_norm"),
                    "epoch": entry.get("epoch"),
                }
            )
    step = state.get("global_step")
    if isinstance(step, int):
        records.append(
            {"event": "checkpoint_saved", "step": step, "ts": mtime, "max_steps": max_steps}
        )
    return records
