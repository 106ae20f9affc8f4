"""Disk guard: see ENOSPC coming instead of letting a save corrupt a checkpoint.

The rule is pure (`disk_verdict`): below `min_free` (auto: `margin` x the last
checkpoint's size) warn; below the hard floor (auto: one more checkpoint plus
5%) pause the run gracefully, because the next save would not fit. The daemon
resumes the run when a later verdict is "ok" or "warn" again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .humanize import format_bytes
from .report import CheckpointReport

DEFAULT_MARGIN = 2.0
FLOOR_SLACK = 1.05

DiskLevel = Literal["ok", "warn", "pause"]


@dataclass(frozen=True)
class DiskVerdict:
    level: DiskLevel
    reason: str | None
    free_bytes: int
    warn_below: int
    pause_below: int


def disk_verdict(
    free_bytes: int,
    last_checkpoint_bytes: int | None,
    *,
    min_free: int | None = None,
    margin: float = DEFAULT_MARGIN,
    hard_floor: int | None = None,
    where: str = "the output filesystem",
) -> DiskVerdict:
    """ok | warn | pause, with the reason in words. With no checkpoint yet and no
    explicit thresholds there is nothing to compare with: ok."""
    last = last_checkpoint_bytes or 0
    pause_below = hard_floor if hard_floor is not None else int(last * FLOOR_SLACK)
    warn_below = min_free if min_free is not None else int(last * margin)
    warn_below = max(warn_below, pause_below)
    free = format_bytes(free_bytes)
    if free_bytes < pause_below:
        what = (
            f"the hard floor ({format_bytes(pause_below)})"
            if hard_floor is not None
            else f"one more checkpoint ({format_bytes(last)}) plus 5%"
        )
        reason = f"{free} free on {where}, less than {what}: pausing before a save fails (ENOSPC)"
        return DiskVerdict("pause", reason, free_bytes, warn_below, pause_below)
    if free_bytes < warn_below:
        what = (
            f"min_free ({format_bytes(warn_below)})"
            if min_free is not None
            else f"{margin:g}x the last checkpoint ({format_bytes(warn_below)})"
        )
        reason = f"{free} free on {where}, below {what}"
        return DiskVerdict("warn", reason, free_bytes, warn_below, pause_below)
    return DiskVerdict("ok", None, free_bytes, warn_below, pause_below)


def free_bytes(path: Path) -> int:
    """Bytes available to an unprivileged writer on the filesystem holding `path`
    (or its nearest existing parent: the output folder may not exist yet)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    stats = os.statvfs(probe)
    return stats.f_bavail * stats.f_frsize


def last_checkpoint_bytes(reports: Iterable[CheckpointReport]) -> int | None:
    """Size of the newest valid checkpoint: the best estimate of the next one."""
    valid = [r for r in reports if r.valid and r.step is not None]
    return max(valid, key=lambda r: r.step or 0).size_bytes if valid else None


def check_disk(
    output_dir: Path,
    last_size: int | None,
    *,
    min_free: int | None = None,
    margin: float = DEFAULT_MARGIN,
    hard_floor: int | None = None,
) -> DiskVerdict:
    """`disk_verdict` for the filesystem of `output_dir`, measured now."""
    return disk_verdict(
        free_bytes(output_dir),
        last_size,
        min_free=min_free,
        margin=margin,
        hard_floor=hard_floor,
        where=str(output_dir),
    )
