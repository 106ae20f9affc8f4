"""Loss anomalies: NaN/inf, or a spike far above the recent median.

A NaN at hour 40 poisons every later step and checkpoint; a spike often comes
from one bad batch. Either way the useful response is to go back to a checkpoint
from before it and skip the data that caused it, so the anomaly carries the
window of steps to skip: everything after the last good observation, up to and
including the anomalous step (with `logging_steps` > 1 the bad batch may be
anywhere in between).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Anomaly:
    step: int
    loss: float
    kind: str  # "nan" | "inf" | "spike"
    median: float | None  # of the recent window, when known
    skip_from: int  # first step of the data window to skip on rollback
    skip_to: int  # last step of it (inclusive)
    reason: str


class LossAnomalyDetector:
    """Feed it (step, loss) in order; it answers an Anomaly or None."""

    def __init__(self, spike_factor: float = 10.0, window: int = 50, min_history: int = 10) -> None:
        if spike_factor <= 1:
            raise ValueError(f"spike_factor must be > 1, got {spike_factor}")
        self.spike_factor = spike_factor
        self.min_history = min_history
        self._recent: deque[float] = deque(maxlen=window)
        self._last_good_step: int | None = None

    def observe(self, step: int, loss: float) -> Anomaly | None:
        if math.isnan(loss) or math.isinf(loss):
            kind = "nan" if math.isnan(loss) else "inf"
            return self._anomaly(step, loss, kind, f"loss is {loss} at step {step}")
        median = self.median()
        if median is not None and median > 0 and loss > self.spike_factor * median:
            reason = (
                f"loss {loss:.4g} at step {step} is {loss / median:.1f} x the median "
                f"{median:.4g} of the last {len(self._recent)} logged steps "
                f"(limit {self.spike_factor:g} x)"
            )
            return self._anomaly(step, loss, "spike", reason)
        self._recent.append(loss)
        self._last_good_step = step
        return None

    def median(self) -> float | None:
        """The recent median, once there is enough history to judge a spike."""
        if len(self._recent) < self.min_history:
            return None
        return statistics.median(self._recent)

    def reset(self) -> None:
        """After a rollback the history restarts (the resumed run re-logs its steps)."""
        self._recent.clear()
        self._last_good_step = None

    def _anomaly(self, step: int, loss: float, kind: str, reason: str) -> Anomaly:
        start = step if self._last_good_step is None else min(step, self._last_good_step + 1)
        window = f"steps {start}-{step}" if start != step else f"step {step}"
        return Anomaly(
            step=step,
            loss=loss,
            kind=kind,
            median=self.median(),
            skip_from=start,
            skip_to=step,
            reason=f"{reason}; skip the data of {window}",
        )
