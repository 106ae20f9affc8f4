"""Which checkpoints to delete, decided by step number, never by mtime.

`plan_retention` is pure so that the rules are testable in isolation: it never
picks the newest valid checkpoint, the newest resumable one, one in flight,
or an invalid/incomplete one (quarantine handles those, and an incomplete one
may still be being written). `apply_retention` renames before deleting so a
crash mid-delete never leaves a half-deleted `checkpoint-N` that looks real.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Set
from pathlib import Path

from ftsup.supervisor.contract import CHECKPOINT_RE

from .report import CheckpointReport

DELETING_PREFIX = ".ftsup-deleting-"


def plan_retention(
    reports: Iterable[CheckpointReport],
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    keep_best: str | None = None,
    metrics: Mapping[int, float] | None = None,
    greater_is_better: bool | None = None,
    in_flight: Set[Path],
) -> list[Path]:
    """The checkpoint folders to delete, by step.

    `keep_last=None` deletes nothing (the trainer rotates its own). `keep_every`
    keeps every step that is a multiple of it (milestones). `keep_best` keeps
    the best checkpoint by that metric, read from `metrics` (step -> value) or
    else from each report's `trainer_state.json` log at its step (`eval_`
    prefix tried too); lower is better for names ending in "loss" unless
    `greater_is_better` says otherwise.
    """
    if keep_last is None:
        return []
    if keep_last < 1:
        raise ValueError(
            "keep_last must be at least 1 (the newest valid checkpoint is never deleted)"
        )
    valid = sorted((r for r in reports if r.valid and r.step is not None), key=_step)
    if not valid:
        return []
    flying = {_norm(p) for p in in_flight}
    keep = {id(r) for r in valid[-keep_last:]}
    keep.add(id(valid[-1]))
    resumable = [r for r in valid if r.resumable]
    if resumable:
        keep.add(id(resumable[-1]))
    if keep_every:
        keep |= {id(r) for r in valid if _step(r) % keep_every == 0}
    if keep_best:
        best = _best(valid, keep_best, metrics, greater_is_better)
        if best is not None:
            keep.add(id(best))
    return [r.path for r in valid if id(r) not in keep and _norm(r.path) not in flying]


def apply_retention(paths: Iterable[Path]) -> list[Path]:
    """Delete the planned folders; the ones actually deleted.

    Refuses (ValueError) anything not named `checkpoint-<N>`: a wrong plan must
    not be able to delete an arbitrary folder.
    """
    planned = [Path(p) for p in paths]
    for path in planned:
        if not CHECKPOINT_RE.match(path.name):
            raise ValueError(f"refusing to delete {path}: not a checkpoint-<N> folder")
    deleted = []
    for path in planned:
        doomed = path.with_name(DELETING_PREFIX + path.name)
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
    for parent in {p.parent for p in planned}:
        finish_interrupted_deletions(parent)
    return deleted


def finish_interrupted_deletions(output_dir: Path) -> list[Path]:
    """Remove folders that a crashed `apply_retention` renamed but did not delete."""
    try:
        leftovers = [p for p in Path(output_dir).iterdir() if p.name.startswith(DELETING_PREFIX)]
    except FileNotFoundError:
        return []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def _step(report: CheckpointReport) -> int:
    return report.step if report.step is not None else -1


def _norm(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _best(
    reports: list[CheckpointReport],
    name: str,
    metrics: Mapping[int, float] | None,
    greater_is_better: bool | None,
) -> CheckpointReport | None:
    higher = greater_is_better if greater_is_better is not None else not name.endswith("loss")
    scored = []
    for report in reports:
        value = _metric(report, name, metrics)
        if value is not None:
            scored.append((value if higher else -value, _step(report), report))
    if not scored:
        return None
    return max(scored, key=lambda item: (item[0], item[1]))[2]


def _metric(
    report: CheckpointReport, name: str, metrics: Mapping[int, float] | None
) -> float | None:
    if metrics is not None:
        return metrics.get(_step(report))
    logged = report.details.get("metrics") or {}
    for key in (name, f"eval_{name}"):
        value = logged.get(key)
        if isinstance(value, int | float):
            return float(value)
    return None
