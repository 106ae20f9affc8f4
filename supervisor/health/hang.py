"""Is a run hung? A pure clock-free rule over its progress observations.

A trainer that hangs (an NCCL collective that never returns, a deadlocked data
loader, SIGSTOP) keeps its process alive and writes nothing. The timeout adapts
to the run: a multiple of its median interval between step records (and of its
median checkpoint save while one is in progress), clamped to [floor, ceiling],
so a run with 2-minute steps is not judged by a 30-second run's standard. Before
the first step an attempt gets the separate, longer `startup_timeout` (model
load, data preparation, compilation). All times are seconds on one clock that
the caller chooses (time.monotonic in the daemon); nothing here reads a clock.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from ftsup.supervisor.spec_types import HealthSection


@dataclass(frozen=True)
class HangPolicy:
    hang_timeout: float | None = None  # fixed; None: adapt to the run
    multiple: float = 10.0
    floor: float = 120.0
    ceiling: float = 3600.0
    startup_timeout: float = 1800.0
    window: int = 50  # recent intervals the medians are taken over

    @classmethod
    def from_spec(cls, health: HealthSection) -> HangPolicy:
        return cls(
            hang_timeout=health.hang_timeout,
            floor=health.hang_floor,
            ceiling=health.hang_ceiling,
            startup_timeout=health.startup_timeout,
        )


@dataclass(frozen=True)
class HangVerdict:
    idle_s: float
    timeout_s: float
    phase: str  # "startup" | "training" | "checkpoint"
    reason: str


class HangDetector:
    """Feed it progress; ask `is_hung(now)`. One detector per attempt."""

    def __init__(self, policy: HangPolicy, *, started_at: float) -> None:
        self.policy = policy
        self._last_progress = started_at
        self._last_step_at: float | None = None
        self._last_step: int | None = None
        self._saving_since: float | None = None
        self._saved_since_last_step = False
        self._step_intervals: deque[float] = deque(maxlen=policy.window)
        self._save_durations: deque[float] = deque(maxlen=policy.window)
        self._waiting_for_nodes = False

    def step(self, step: int, at: float) -> None:
        """A step record. Only an advancing step counts (a repeated one is a heartbeat)."""
        self._waiting_for_nodes = False
        if self._last_step is not None and step <= self._last_step:
            self.heartbeat(at)
            return
        if self._last_step_at is not None and not self._saved_since_last_step:
            self._step_intervals.append(max(0.0, at - self._last_step_at))
        self._last_step, self._last_step_at = step, at
        self._saved_since_last_step = self._saving_since is not None
        self._touch(at)

    def heartbeat(self, at: float) -> None:
        self._waiting_for_nodes = False
        self._touch(at)

    def waiting_for_nodes(self, at: float) -> None:
        """A multi-node launcher waits in the rendezvous for the job's other nodes:
        no timeout until the next progress (a node that never comes is waited for,
        and shown; the start-up timeout counts from when all nodes met)."""
        self._waiting_for_nodes = True
        self._touch(at)

    def checkpoint_started(self, at: float) -> None:
        self._saving_since = at
        self._saved_since_last_step = True
        self._touch(at)

    def checkpoint_finished(self, at: float) -> None:
        if self._saving_since is not None:
            self._save_durations.append(max(0.0, at - self._saving_since))
        self._saving_since = None
        self._touch(at)

    @property
    def saving(self) -> bool:
        return self._saving_since is not None

    def timeout(self) -> tuple[float, str]:
        """The timeout now in force and how it was derived (for the verdict and the TUI)."""
        policy = self.policy
        if self._last_step is None:
            return policy.startup_timeout, "startup timeout"
        if policy.hang_timeout is not None:
            return policy.hang_timeout, "configured hang_timeout"
        basis, label = self._basis()
        if basis is None:
            return policy.ceiling, f"ceiling (no {label} measured yet)"
        raw = policy.multiple * basis
        derived = f"{policy.multiple:g} x median {label} {_s(basis)}"
        if raw < policy.floor:
            return policy.floor, f"floor ({derived} = {_s(raw)})"
        if raw > policy.ceiling:
            return policy.ceiling, f"ceiling ({derived} = {_s(raw)})"
        return raw, derived

    def is_hung(self, now: float) -> HangVerdict | None:
        if self._waiting_for_nodes:
            return None
        idle = now - self._last_progress
        limit, how = self.timeout()
        if idle <= limit:
            return None
        if self._last_step is None:
            phase = "startup"
            reason = f"no first step after {_s(idle)}; {how} {_s(limit)}"
        else:
            phase = "checkpoint" if self.saving else "training"
            during = " while saving a checkpoint" if self.saving else ""
            reason = f"no progress for {_s(idle)}{during}; timeout {_s(limit)} = {how}"
        return HangVerdict(idle, limit, phase, reason)

    def _basis(self) -> tuple[float | None, str]:
        step = statistics.median(self._step_intervals) if self._step_intervals else None
        if not self.saving:
            return step, "step"
        save = statistics.median(self._save_durations) if self._save_durations else None
        if save is None:
            return None, "save"
        return (save, "save") if step is None or save >= step else (step, "step")

    def _touch(self, at: float) -> None:
        self._last_progress = max(self._last_progress, at)


def _s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
