"""The restart policy: a pure function of the attempt history and the last exit.

    decide(history, exit, policy, now) -> Restart | GiveUp | Done | Stopped

No I/O, no clock reads, no globals: every branch is tested on its own, and the
daemon records each decision as an event with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ftsup.supervisor.contract import EXIT_CONFIG, EXIT_OK, EXIT_STOPPED
from ftsup.supervisor.durations import format_duration
from ftsup.supervisor.spec_types import RestartSection

# Failure classes that no restart can fix: the job (or its environment) must change.
NEVER_RETRY = {"config_error": "configuration error", "locked": "output folder locked"}


@dataclass(frozen=True)
class AttemptOutcome:
    """What one finished attempt did: how it ended and whether it made progress."""

    returncode: int | None
    signal: int | None
    start_step: int  # the step it resumed from (0 from scratch)
    last_step: int  # the highest step it reported
    stop_requested: bool = False  # ftsup or a user asked it to stop
    failure_kind: str | None = None  # from diagnosis; None when unknown

    @property
    def is_failure(self) -> bool:
        return not (
            self.returncode == EXIT_OK
            or (self.returncode == EXIT_STOPPED)
            or (self.stop_requested and self.failure_kind != "hang")
        )


@dataclass(frozen=True)
class OtherNodes:
    """What the other nodes of a multi-node job counted (their shared records): every
    failure ends the attempt on every node, so the job's count is the highest any
    node has, and a node that rejoined late does not start its budget afresh."""

    failures: int = 0  # failure restarts
    stalled: int = 0  # failures in a row without step progress


@dataclass(frozen=True)
class Restart:
    after: float  # seconds to wait before the next attempt
    reason: str


@dataclass(frozen=True)
class GiveUp:
    reason: str


@dataclass(frozen=True)
class Done:
    reason: str


@dataclass(frozen=True)
class Stopped:
    reason: str


Decision = Restart | GiveUp | Done | Stopped


def _describe(outcome: AttemptOutcome) -> str:
    if outcome.signal is not None:
        return f"killed by signal {outcome.signal}"
    return f"exit code {outcome.returncode}"


def made_progress(history: Sequence[AttemptOutcome]) -> list[bool]:
    """Per attempt: did it reach a step that no earlier attempt had reached?

    A run that resumes at step 10 and crashes at 12 every time re-runs steps
    but never gets further: that is a crash loop, even though steps advance.
    """
    flags = []
    high_water = 0
    for outcome in history:
        flags.append(outcome.last_step > max(high_water, outcome.start_step))
        high_water = max(high_water, outcome.last_step)
    return flags


def consecutive_failures_without_progress(history: Sequence[AttemptOutcome]) -> int:
    """Failures in a row, counted from the newest, that got no further than before."""
    count = 0
    for outcome, progressed in zip(
        reversed(history), reversed(made_progress(history)), strict=True
    ):
        if not outcome.is_failure or progressed:
            break
        count += 1
    return count


def failure_restarts(history: Sequence[AttemptOutcome]) -> int:
    return sum(1 for outcome in history if outcome.is_failure)


def backoff_delay(stalled_failures: int, policy: RestartSection) -> float:
    """0 after a failure that made progress; base * 2^(n-1) for the n-th failure
    in a row without progress, capped.

    A run that trained for hours and then crashed once restarts at once: every
    second before its next step is lost goodput, and nothing suggests that
    waiting would help. Failures that get nowhere back off, then give up.
    """
    if stalled_failures == 0:
        return 0.0
    doublings = min(stalled_failures - 1, 64)  # 2**64 outgrows any cap; no float overflow
    return float(min(policy.backoff_max, policy.backoff * float(2**doublings)))


def decide(
    history: Sequence[AttemptOutcome],
    policy: RestartSection,
    others: OtherNodes | None = None,
) -> Decision:
    """Judge the newest attempt (the last item of `history`) given all before it;
    `others`: a multi-node job's counts on its other nodes (limits are per job)."""
    if not history:
        raise ValueError("decide() needs at least the attempt that just ended")
    last = history[-1]
    if last.returncode == EXIT_OK:
        return Done("the trainer finished (exit code 0)")
    if last.returncode == EXIT_CONFIG:
        return GiveUp("configuration error (exit code 2): fix the job and start it again")
    if last.failure_kind in NEVER_RETRY and last.returncode != EXIT_STOPPED:
        return GiveUp(f"{NEVER_RETRY[last.failure_kind]}: not restarted ({_describe(last)})")
    if last.stop_requested and last.failure_kind != "hang":
        how = "saved and stopped" if last.returncode == EXIT_STOPPED else _describe(last)
        return Stopped(f"stopped on request ({how})")
    if last.returncode == EXIT_STOPPED:
        return Restart(0.0, "the trainer saved and stopped (exit code 75): resuming")
    failures = failure_restarts(history)
    stalled = consecutive_failures_without_progress(history)
    where = ""
    if others is not None and (others.failures > failures or others.stalled > stalled):
        failures, stalled = max(failures, others.failures), max(stalled, others.stalled)
        where = ", counted on all nodes"
    if failures > policy.max_restarts:
        return GiveUp(
            f"{_describe(last)}; restart limit reached "
            f"({policy.max_restarts} restarts, max_restarts = {policy.max_restarts}{where})"
        )
    if stalled >= policy.crash_loop:
        return GiveUp(
            f"crash loop: {stalled} failures in a row without step progress "
            f"(crash_loop = {policy.crash_loop}{where}); last: {_describe(last)}"
        )
    delay = backoff_delay(stalled, policy)
    kind = f" ({last.failure_kind})" if last.failure_kind else ""
    when = f"in {format_duration(delay)}" if delay else "at once (it made progress)"
    return Restart(
        delay,
        f"{_describe(last)}{kind}; restart {failures} of {policy.max_restarts}{where} {when}",
    )
