"""Following a run's progress: `progress.jsonl` lines, or HF `trainer_state.json`.

The built-in trainer (and any script using `FtsupCallback`) appends JSON lines
to `progress.jsonl`. Other HF-style trainers don't, so for them the newest
checkpoint's `trainer_state.json` `log_history` is the source. Either way the
daemon keeps one `ProgressState` per job; rates and ETA count only the steps
since the current attempt started, so a restart does not distort them.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftsup.supervisor.follow import LineFollower


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
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def records_from_trainer_state(path: Path) -> list[dict[str, Any]]:
    """Progress records from an HF `trainer_state.json` (for jobs without progress.jsonl)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    if not isinstance(state, dict):
        return []
    max_steps = state.get("max_steps")
    mtime = os.stat(path).st_mtime
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
