"""Deliberate crashes for the demo and the tests (off unless the environment asks).

`FTSUP_FAULT_AT_STEP=N` kills the trainer with SIGKILL when step N ends, as a
real crash would. `FTSUP_FAULT_POINT=before_manifest` instead kills it after
every file of checkpoint N is written but before its manifest, i.e. in the
middle of a checkpoint; `before_handover` kills a rank of a sharded run
(DeepSpeed, FSDP) after it wrote its shards of checkpoint N, before it handed
their checksums to rank 0's seal; `after_weights`, `after_optimizer`, `after_scheduler`
and `after_trainer_state` kill it inside an asynchronous save's background
write, right after that file. `memory_after_tensors` (the tensors copied,
nothing else written) and `memory_before_seal` (every file written, no record)
kill it inside the memory tier's write of the first snapshot taken from step N
on (`memory_tier.py`: with `max_overhead` a snapshot may be spaced out, so step
N itself may have none).
`FTSUP_FAULT_WRITE_DELAY=seconds` makes the
asynchronous disk writer sleep before each file, so that a kill from outside lands
in the middle of a write; `FTSUP_FAULT_STEP_DELAY=seconds` makes every step
that long at least (a slow GPU), so that a test can act while a tiny model
trains. `FTSUP_FAULT_ONCE_FILE=path` makes the fault fire
only once (the file is created just before the kill), so the restarted run
goes on. `FTSUP_FAULT_RANK=R` fires it on rank R alone (default: every rank
that reaches the point), so one rank of a distributed run dies as on a real
fault while the others carry on until the launcher notices.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ftsup.supervisor.contract import (
    ENV_FAULT_AT_STEP,
    ENV_FAULT_ONCE_FILE,
    ENV_FAULT_POINT,
    ENV_FAULT_RANK,
    ENV_FAULT_STEP_DELAY,
    ENV_FAULT_WRITE_DELAY,
)

WRITE_POINTS = ("after_weights", "after_optimizer", "after_scheduler", "after_trainer_state")
# The memory tier's write of a snapshot (`memory_snapshot.take_snapshot`).
MEMORY_POINTS = ("memory_after_tensors", "memory_before_seal")
POINTS = ("step_end", "before_handover", "before_manifest", *WRITE_POINTS, *MEMORY_POINTS)


def write_delay() -> float:
    """Seconds the background writer sleeps before each file (tests only; 0 otherwise)."""
    return float(os.environ.get(ENV_FAULT_WRITE_DELAY) or 0.0)


class StepDelay(TrainerCallback):  # type: ignore[misc]
    """Sleep at the end of every step (FTSUP_FAULT_STEP_DELAY; tests and demos only)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    @classmethod
    def from_env(cls) -> StepDelay | None:
        seconds = float(os.environ.get(ENV_FAULT_STEP_DELAY) or 0.0)
        return cls(seconds) if seconds > 0 else None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        time.sleep(self.seconds)


class FaultInjector(TrainerCallback):  # type: ignore[misc]
    """SIGKILL this process at a chosen step; must run before FtsupCallback."""

    def __init__(
        self,
        step: int,
        point: str = "step_end",
        once_file: Path | None = None,
        rank: int | None = None,
    ) -> None:
        if point not in POINTS:
            raise ValueError(f"{ENV_FAULT_POINT}={point!r}: use one of {POINTS}")
        self.step, self.point, self.once_file = step, point, once_file
        self.rank = rank

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        step = os.environ.get(ENV_FAULT_AT_STEP)
        if not step:
            return None
        once = os.environ.get(ENV_FAULT_ONCE_FILE)
        rank = os.environ.get(ENV_FAULT_RANK)
        return cls(
            int(step),
            os.environ.get(ENV_FAULT_POINT, "step_end"),
            Path(once) if once else None,
            int(rank) if rank else None,
        )

    def fire(self, step: int, point: str) -> None:
        """SIGKILL now if this is the chosen step and point (any thread may call it)."""
        if point != self.point:
            return
        if step != self.step and not (point in MEMORY_POINTS and step > self.step):
            return
        if self.rank is not None and self.rank != int(os.environ.get("RANK", "0")):
            return
        if self.once_file is not None:
            if self.once_file.exists():
                return
            self.once_file.write_text(f"fault at step {step} ({point})\n")
        os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.fire(state.global_step, "step_end")
        # The other points are fired by the Checkpointer (before_manifest, through
        # its on_point hook), by the asynchronous writer (after_*) and by the
        # memory tier (memory_*).
