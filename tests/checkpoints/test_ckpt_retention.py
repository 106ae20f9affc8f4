"""Retention by step number: the newest valid checkpoint survives any mtimes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ftsup.supervisor.checkpoints.discovery import list_checkpoints, validate_all
from ftsup.supervisor.checkpoints.report import CheckpointReport
from ftsup.supervisor.checkpoints.retention import (
    DELETING_PREFIX,
    apply_retention,
    finish_interrupted_deletions,
    plan_retention,
)

from .conftest import Factory


def _report(
    step: int, *, valid: bool = True, resumable: bool = True, **metrics: float
) -> CheckpointReport:
    return CheckpointReport(
        path=Path(f"/out/checkpoint-{step}"),
        step=step,
        format="hf",
        valid=valid,
        resumable=valid and resumable,
        reason=None if valid else "broken",
        size_bytes=1,
        mtime=float(1000 - step),  # older steps look newer: mtime must not matter
        details={"metrics": metrics},
    )


def _steps(paths: list[Path]) -> list[int]:
    return [int(p.name.split("-")[1]) for p in paths]


def test_keep_last_by_step_not_mtime() -> None:
    reports = [_report(s) for s in (100, 20, 300, 40, 5)]
    assert _steps(plan_retention(reports, keep_last=2, in_flight=set())) == [5, 20, 40]


def test_keep_last_none_deletes_nothing() -> None:
    assert plan_retention([_report(s) for s in (1, 2, 3)], keep_last=None, in_flight=set()) == []


def test_keep_last_must_keep_one() -> None:
    with pytest.raises(ValueError):
        plan_retention([_report(1)], keep_last=0, in_flight=set())


def test_invalid_and_in_flight_are_never_deleted() -> None:
    reports = [_report(1), _report(2), _report(3, valid=False), _report(4), _report(5, valid=False)]
    plan = plan_retention(reports, keep_last=1, in_flight={Path("/out/checkpoint-2")})
    assert _steps(plan) == [1]  # 4 is the newest valid; 3 and 5 are quarantine's business


def test_newest_resumable_survives_weights_only_saves() -> None:
    reports = [_report(1), _report(2), _report(3, resumable=False), _report(4, resumable=False)]
    assert _steps(plan_retention(reports, keep_last=1, in_flight=set())) == [1, 3]


def test_keep_every_keeps_milestones() -> None:
    reports = [_report(s) for s in range(100, 1100, 100)]
    plan = plan_retention(reports, keep_last=2, keep_every=500, in_flight=set())
    assert _steps(plan) == [100, 200, 300, 400, 600, 700, 800]


def test_keep_best_from_logged_metrics_and_explicit_values() -> None:
    reports = [_report(1, eval_loss=3.0), _report(2, eval_loss=1.0), _report(3, eval_loss=2.0)]
    assert _steps(plan_retention(reports, keep_last=1, keep_best="loss", in_flight=set())) == [1]
    accuracy = {1: 0.9, 2: 0.5, 3: 0.7}
    plan = plan_retention(reports, keep_last=1, keep_best="acc", metrics=accuracy, in_flight=set())
    assert _steps(plan) == [2]


def test_real_checkpoints_with_skewed_mtimes(output_dir: Factory) -> None:
    out = output_dir("hf")
    for extra in (8, 10):  # more checkpoints, copies of the last one
        shutil.copytree(out / "checkpoint-6", out / f"checkpoint-{extra}")
        state = (out / f"checkpoint-{extra}" / "trainer_state.json").read_text()
        (out / f"checkpoint-{extra}" / "trainer_state.json").write_text(
            state.replace('"global_step": 6', f'"global_step": {extra}')
        )
    # the newest step gets the oldest mtime, the oldest step a future one
    for ckpt in list_checkpoints(out):
        step = int(ckpt.name.split("-")[1])
        stamp = 2_000_000_000 - step * 10**8
        for path in [ckpt, *ckpt.iterdir()]:
            os.utime(path, (stamp, stamp))
    reports = validate_all(out)
    assert all(r.valid for r in reports)
    plan = plan_retention(reports, keep_last=1, in_flight=set())
    assert _steps(plan) == [2, 4, 6, 8]
    assert _steps(apply_retention(plan)) == [2, 4, 6, 8]
    assert [p.name for p in out.iterdir()] == ["checkpoint-10"]


def test_apply_retention_refuses_other_names(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError):
        apply_retention([tmp_path / "data"])
    assert (tmp_path / "data").is_dir()
    assert apply_retention([tmp_path / "checkpoint-9"]) == []  # already gone: fine


def test_interrupted_deletions_are_finished(tmp_path: Path) -> None:
    (tmp_path / f"{DELETING_PREFIX}checkpoint-1").mkdir()
    (tmp_path / "checkpoint-2").mkdir()
    assert [p.name for p in finish_interrupted_deletions(tmp_path)] == [
        f"{DELETING_PREFIX}checkpoint-1"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]
