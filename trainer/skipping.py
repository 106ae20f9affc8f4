"""Skip the data of given steps after a loss-anomaly rollback (`FTSUP_SKIP_STEPS`).

The daemon rolls a run back to a checkpoint from before a NaN or a spike and
passes the steps whose data caused it, e.g. `FTSUP_SKIP_STEPS=101-110,205-205`
(inclusive optimizer-step numbers). Those steps still happen: their batches
are consumed and the learning-rate schedule advances, so step numbers, the
data position of later steps and resumes stay exactly as planned; but no
forward or backward pass runs, every gradient stays None, and the optimizer
leaves every parameter (and its state) untouched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ftsup.supervisor.contract import ENV_SKIP_STEPS

Window = tuple[int, int]


def parse_skip_windows(text: str | None) -> tuple[Window, ...]:
    """`"101-110,205-205"` -> ((101, 110), (205, 205)); ValueError on anything else."""
    windows = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        first, sep, last = part.partition("-")
        if not sep or not first.strip().isdigit() or not last.strip().isdigit():
            raise ValueError(f"{ENV_SKIP_STEPS}: {part!r} is not FIRST-LAST (step numbers)")
        window = (int(first), int(last))
        if window[0] < 1 or window[1] < window[0]:
            raise ValueError(f"{ENV_SKIP_STEPS}: {part!r} is not an increasing range of steps >= 1")
        windows.append(window)
    return tuple(windows)


def skip_windows_from_env() -> tuple[Window, ...]:
    return parse_skip_windows(os.environ.get(ENV_SKIP_STEPS))


def in_windows(step: int, windows: Sequence[Window]) -> bool:
    return any(first <= step <= last for first, last in windows)


def with_skipped_steps(trainer_class: Any, windows: Sequence[Window]) -> Any:
    """A subclass of `trainer_class` whose steps in `windows` do not learn."""
    if not windows:
        return trainer_class
    import torch

    class SkippingTrainer(trainer_class):  # type: ignore[misc,valid-type]
        def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if in_windows(self.state.global_step + 1, windows):
                # No backward: grads stay None, so optimizer.step() skips every parameter.
                return torch.zeros((), device=self.args.device)
            return super().training_step(model, inputs, *args, **kwargs)

    return SkippingTrainer
