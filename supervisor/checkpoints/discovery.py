"""Finding checkpoints and choosing the one a run resumes from.

Ordered by the step in the folder name, never by mtime: copies, restores and
clock changes make mtimes lie. Resume selection walks from the newest step
down, quarantining every invalid folder it passes so that no later resume (by
ftsup or by the trainer's own "latest checkpoint" logic) trips over it.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

from ftsup.supervisor.contract import CHECKPOINT_RE

from .ftsup_format import has_manifest
from .quarantine import quarantine as _quarantine
from .report import CheckpointReport, checkpoint_step
from .validate import validate_checkpoint


@dataclass(frozen=True)
class Quarantined:
    """A folder that resume selection moved away; `report.path` is the old path."""

    report: CheckpointReport
    moved_to: Path


@dataclass(frozen=True)
class ResumeChoice:
    """`checkpoint`: what to resume from (None: nothing valid; start from scratch
    if the job allows it). `quarantined`: emit one event each. `skipped`:
    newer folders passed over without quarantine (weights only, possibly still
    being written, or quarantine disabled), each with its reason. `unchecked`:
    the folder where selection stopped because it could not be read (EMFILE,
    EACCES, EIO...): nothing older may be chosen over it, so `checkpoint` is
    None and the caller must wait and try again, not start over."""

    checkpoint: CheckpointReport | None
    quarantined: tuple[Quarantined, ...] = ()
    skipped: tuple[CheckpointReport, ...] = ()
    unchecked: CheckpointReport | None = None

    @property
    def path(self) -> Path | None:
        return self.checkpoint.path if self.checkpoint else None

    @property
    def step(self) -> int | None:
        return self.checkpoint.step if self.checkpoint else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-<N>` folders by N (quarantined and other names ignored)."""
    try:
        entries = [
            p for p in Path(output_dir).iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()
        ]
    except FileNotFoundError:
        return []
    return sorted(entries, key=lambda p: checkpoint_step(p) or 0)


def manifests_expected(output_dir: Path) -> bool:
    """True when any checkpoint here has an ftsup manifest: its writer writes one
    for every checkpoint, so a folder without one is an interrupted save."""
    return any(has_manifest(p) for p in list_checkpoints(output_dir))


def validate_all(
    output_dir: Path,
    *,
    deep: bool = False,
    world_size: int | None = None,
    require_manifest: bool | None = None,
    ranks: Collection[int] | None = None,
) -> list[CheckpointReport]:
    """A report per checkpoint, by step. `require_manifest=None`: decide by
    `manifests_expected`. `ranks`: see `validate_checkpoint`."""
    if require_manifest is None:
        require_manifest = manifests_expected(output_dir)
    reports = []
    for path in list_checkpoints(output_dir):
        try:
            reports.append(
                validate_checkpoint(
                    path,
                    deep=deep,
                    world_size=world_size,
                    require_manifest=require_manifest,
                    ranks=ranks,
                )
            )
        except FileNotFoundError:  # removed while listing (the trainer's rotation)
            continue
    return reports


def select_resume(
    output_dir: Path,
    *,
    world_size: int | None = None,
    quarantine: bool = True,
    skip_newer_than: float | None = None,
    require_manifest: bool | None = None,
    deep: bool = False,
    now: float | None = None,
    ranks: Collection[int] | None = None,
) -> ResumeChoice:
    """The newest valid and resumable checkpoint, falling back as far as needed.

    Every newer invalid folder is quarantined on the way (when `quarantine`),
    except one written to within the last `skip_newer_than` seconds: its writer
    may still be at work, so it is skipped and left alone. Call this only when
    no trainer of the job runs; `skip_newer_than` is the safety net.
    `world_size`: the job's process count. A checkpoint complete for fewer
    processes is accepted when the job grew since (see `_judge`), and refused
    when an older checkpoint shows it lost ranks. `ranks`: the ranks whose files
    a node-local copy must hold (a manifest's own `ranks` wins).
    """
    if require_manifest is None:
        require_manifest = manifests_expected(output_dir)
    now = time.time() if now is None else now
    moved: list[Quarantined] = []
    skipped: list[CheckpointReport] = []
    paths = list_checkpoints(output_dir)
    for index in range(len(paths) - 1, -1, -1):
        path = paths[index]
        try:
            report = _judge(
                path,
                older=paths[:index],
                world_size=world_size,
                deep=deep,
                require_manifest=require_manifest,
                ranks=ranks,
            )
        except FileNotFoundError:  # deleted meanwhile (rotation): gone, not invalid
            continue
        if not report.checked:  # could not look: never fall back past it
            return ResumeChoice(None, tuple(moved), tuple(skipped), unchecked=report)
        if report.resumable:
            return ResumeChoice(report, tuple(moved), tuple(skipped))
        recent = skip_newer_than is not None and now - report.mtime < skip_newer_than
        if report.valid or not quarantine or recent:
            skipped.append(report)
            continue
        moved.append(Quarantined(report, _quarantine(path, report.reason or "invalid")))
    return ResumeChoice(None, tuple(moved), tuple(skipped))


class UncheckedCheckpoint(OSError):
    """A checkpoint could not be read (EMFILE, EACCES, EIO...): which steps are
    resumable is unknown, so nothing may be chosen past it."""


def resumable_steps(
    output_dir: Path,
    *,
    world_size: int | None = None,
    require_manifest: bool | None = None,
    ranks: Collection[int] | None = None,
) -> tuple[list[int], ResumeChoice]:
    """Every resumable step here, newest first, with the newest one's choice.

    A node-local folder (`save_on_each_node`) holds one node's copies, and the
    nodes must resume a step that every node holds: the newest is found (and the
    invalid folders above it quarantined) as `select_resume` does, then the older
    ones are judged too, never quarantined (an older copy that is not resumable is
    only left out). Raises UncheckedCheckpoint when a folder could not be read.
    """
    if require_manifest is None:
        require_manifest = manifests_expected(output_dir)
    choice = select_resume(
        output_dir, world_size=world_size, require_manifest=require_manifest, ranks=ranks
    )
    if choice.unchecked is not None:
        raise UncheckedCheckpoint(f"{choice.unchecked.path}: {choice.unchecked.reason}")
    if choice.step is None:
        return [], choice
    steps = [choice.step]
    paths = [p for p in list_checkpoints(output_dir) if (checkpoint_step(p) or 0) < choice.step]
    for index in range(len(paths) - 1, -1, -1):
        try:
            report = _judge(
                paths[index],
                older=paths[:index],
                world_size=world_size,
                deep=False,
                require_manifest=require_manifest,
                ranks=ranks,
            )
        except FileNotFoundError:
            continue
        if not report.checked:
            raise UncheckedCheckpoint(f"{paths[index]}: {report.reason}")
        if report.resumable and report.step is not None:
            steps.append(report.step)
    return steps, choice


def _judge(
    path: Path,
    *,
    older: list[Path],
    world_size: int | None,
    deep: bool,
    require_manifest: bool,
    ranks: Collection[int] | None = None,
) -> CheckpointReport:
    """Validate against the job's world size, but tell a grown job from lost ranks.

    A checkpoint complete for fewer processes than the job now runs was either
    written before the job grew (drift: the drift guard's business, never a
    reason to quarantine) or lost its highest ranks' files in a crash. The
    nearest older valid checkpoint decides: if it was written by more processes
    than this one holds, ranks were lost.
    """
    report = validate_checkpoint(
        path, deep=deep, world_size=world_size, require_manifest=require_manifest, ranks=ranks
    )
    if report.valid or not world_size or not report.checked:
        return report
    alone = validate_checkpoint(path, deep=deep, require_manifest=require_manifest, ranks=ranks)
    if not alone.checked:
        return alone
    own = alone.details.get("world_size")
    if not alone.valid or not isinstance(own, int) or own >= world_size:
        return report
    for previous in reversed(older):
        try:
            other = validate_checkpoint(previous, require_manifest=require_manifest, ranks=ranks)
        except FileNotFoundError:
            continue
        if not other.checked:  # cannot tell growth from lost ranks: decide nothing
            return replace(report, valid=False, resumable=False, reason=other.reason, checked=False)
        if other.valid:
            other_size = other.details.get("world_size")
            if isinstance(other_size, int) and other_size > own:
                return report
            break
    note = f"written by {own} processes; the job runs {world_size} (the world size changed)"
    details = dict(alone.details)
    details["notes"] = [*alone.notes, note]
    return replace(alone, details=details)
