"""Watching a run's loss: anomalies (NaN, inf, spikes) and jumps after a resume.

The runner feeds every progress line of the current attempt. An anomaly is
answered by the job's `[health] loss_anomaly` policy (the runner acts on it);
a loss after a resume far from the one before the interruption is a warning
event (a resume that restored the wrong state usually shows up this way).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from ftsup.supervisor.checkpoints.postresume import DEFAULT_WINDOW, loss_jump
from ftsup.supervisor.health.loss import Anomaly, LossAnomalyDetector
from ftsup.supervisor.spec_types import HealthSection

HISTORY = 500

Emit = Callable[[str, str, dict[str, Any]], object]


class LossWatch:
    def __init__(self, health: HealthSection, emit: Emit) -> None:
        self.detector = LossAnomalyDetector(spike_factor=health.loss_spike_factor)
        self._emit = emit
        self._history: deque[tuple[int, float]] = deque(maxlen=HISTORY)  # (step, loss)
        self._before: list[float] = []
        self._after: list[float] = []
        self._checked = True
        self._resume_step = 0

    def begin_attempt(self, start_step: int) -> None:
        """The losses an earlier attempt logged up to the resume point are the reference."""
        self._before = [loss for step, loss in self._history if step <= start_step]
        self._after = []
        self._checked = start_step == 0 or not self._before
        self._resume_step = start_step

    def remember(self, step: int, loss: float) -> None:
        """A loss an earlier attempt logged (replayed): history only, never judged."""
        self._history.append((step, loss))

    def rolled_back(self) -> None:
        self.detector.reset()

    def observe(self, step: int, loss: float) -> Anomaly | None:
        anomaly = self.detector.observe(step, loss)
        if anomaly is not None:
            return anomaly
        self._history.append((step, loss))
        if not self._checked and step > self._resume_step and math.isfinite(loss):
            self._after.append(loss)
            if len(self._after) >= DEFAULT_WINDOW:
                self._checked = True
                warning = loss_jump(self._before, self._after)
                if warning is not None:
                    self._emit(
                        "warning",
                        f"after resuming at step {self._resume_step}: {warning}",
                        {"resume_step": self._resume_step},
                    )
        return None
