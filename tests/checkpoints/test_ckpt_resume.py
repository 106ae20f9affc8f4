"""Resume selection on real checkpoints: quarantine, fallback, restore, a real
resume that finishes, and a writer SIGKILLed at many points of a save."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftsup.supervisor.checkpoints.discovery import list_checkpoints, select_resume
from ftsup.supervisor.checkpoints.quarantine import (
    list_quarantined,
    quarantine,
    quarantine_reason,
    reason_slug,
    restore,
)
from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.manifest import MANIFEST_NAME

from . import builders
from .conftest import Factory


def test_list_checkpoints_sorts_by_step_number_and_ignores_others(tmp_path: Path) -> None:
    for name in (
        "checkpoint-10",
        "checkpoint-9",
        "checkpoint-100",
        "checkpoint-2.invalid-x",
        "run",
    ):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-7").write_text("a file, not a folder")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-9",
        "checkpoint-10",
        "checkpoint-100",
    ]
    assert [p.name for p in list_quarantined(tmp_path)] == ["checkpoint-2.invalid-x"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_quarantine_and_restore_round_trip(output_dir: Factory) -> None:
    out = output_dir("hf")
    reason = "optimizer.pt truncated: central directory missing"
    moved = quarantine(out / "checkpoint-6", reason)
    assert moved.name == "checkpoint-6.invalid-optimizer-pt-truncated-central-directory-missing"
    assert quarantine_reason(moved) == reason
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    back = restore(moved)
    assert back == out / "checkpoint-6"
    assert not (back / "ftsup-quarantine.json").exists()
    assert validate_checkpoint(back).valid


def test_quarantine_name_collisions_and_refusals(tmp_path: Path) -> None:
    for _ in range(2):
        (tmp_path / "checkpoint-3").mkdir()
        quarantine(tmp_path / "checkpoint-3", "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-3.invalid-bad",
        "checkpoint-3.invalid-bad-2",
    ]
    (tmp_path / "checkpoint-3").mkdir()  # an empty folder: rename would replace it
    with pytest.raises(FileExistsError):
        restore(tmp_path / "checkpoint-3.invalid-bad")
    with pytest.raises(ValueError):
        quarantine(tmp_path / "checkpoint-3.invalid-bad", "again")
    with pytest.raises(ValueError):
        restore(tmp_path / "checkpoint-3")


def test_reason_slug() -> None:
    assert reason_slug("trainer_state.json missing (the trainer writes it last)") == (
        "trainer-state-json-missing-the-trainer-writes"
    )
    assert reason_slug("!!!") == "invalid"
    assert len(reason_slug("x" * 200)) <= 48


def test_falls_back_over_several_invalid_checkpoints(output_dir: Factory) -> None:
    out = output_dir("hf")
    builders.truncate(out / "checkpoint-6" / "optimizer.pt")
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    choice = select_resume(out)
    assert choice.step == 2
    assert [q.report.step for q in choice.quarantined] == [6, 4]


def test_nothing_valid_returns_none(output_dir: Factory) -> None:
    out = output_dir("hf")
    for ckpt in list_checkpoints(out):
        builders.zero(ckpt / "model.safetensors")
    choice = select_resume(out)
    assert choice.checkpoint is None and choice.path is None
    assert len(choice.quarantined) == 3
    assert select_resume(out / "missing").checkpoint is None


def test_quarantine_false_only_reports(output_dir: Factory) -> None:
    out = output_dir("hf")
    builders.truncate(out / "checkpoint-6" / "optimizer.pt")
    choice = select_resume(out, quarantine=False)
    assert choice.step == 4 and choice.quarantined == ()
    assert [r.step for r in choice.skipped] == [6]
    assert (out / "checkpoint-6").is_dir()


def test_a_folder_still_being_written_is_left_alone(output_dir: Factory) -> None:
    out = output_dir("hf")
    (out / "checkpoint-6" / "trainer_state.json").unlink()  # the save is not done yet
    os.utime(out / "checkpoint-6")
    choice = select_resume(out, skip_newer_than=30.0)
    assert choice.step == 4 and choice.quarantined == ()
    assert (out / "checkpoint-6").is_dir()
    later = select_resume(out, skip_newer_than=30.0, now=time.time() + 60)
    assert [q.report.step for q in later.quarantined] == [6]


def _set_ranks(ckpt: Path, ranks: int) -> None:
    """Make the folder look saved by `ranks` processes (one RNG file each)."""
    rng = next(ckpt.glob("rng_state*.pth")).read_bytes()
    for old in ckpt.glob("rng_state*.pth"):
        old.unlink()
    for rank in range(ranks):
        (ckpt / f"rng_state_{rank}.pth").write_bytes(rng)


def test_a_grown_job_keeps_the_checkpoints_of_its_smaller_past(output_dir: Factory) -> None:
    out = output_dir("hf2")  # saved by 2 processes; the job now runs 4
    choice = select_resume(out, world_size=4)
    assert choice.step == 6 and choice.quarantined == ()
    assert choice.checkpoint is not None
    assert any("the world size changed" in n for n in choice.checkpoint.notes)


def test_lost_highest_ranks_are_told_from_a_grown_job(output_dir: Factory) -> None:
    out = output_dir("hf")
    for step in (2, 4):
        _set_ranks(out / f"checkpoint-{step}", 4)
    _set_ranks(out / "checkpoint-6", 2)  # ranks 2 and 3 died before writing theirs
    assert select_resume(out, quarantine=False).step == 6  # invisible without the world size
    choice = select_resume(out, world_size=4)
    assert choice.step == 4
    assert [q.report.reason for q in choice.quarantined] == [
        "rng_state_2.pth missing (world size 4)"
    ]


def test_resume_from_the_choice_finishes_the_run(output_dir: Factory) -> None:
    out = output_dir("hf")
    builders.truncate(out / "checkpoint-6" / "optimizer.pt")
    choice = select_resume(out)
    assert choice.path == out / "checkpoint-4"
    trainer = builders.train(out, resume_from=choice.path)
    assert trainer.state.global_step == builders.MAX_STEPS
    final = validate_checkpoint(out / "checkpoint-6", deep=True)
    assert final.valid and final.resumable
    assert select_resume(out).step == builders.MAX_STEPS


# -- SIGKILL during a save ------------------------------------------------------

# The order in which the HF Trainer writes a checkpoint (trainer_state.json last);
# the ftsup writer then adds its manifest.
HF_ORDER = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
)

WRITER = r"""
import os, signal, sys
src, dst, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = sys.argv[4:]
written = 0
os.makedirs(dst)
for name in names:
    data = open(os.path.join(src, name), "rb").read()
    with open(os.path.join(dst, name), "wb") as out:
        for start in range(0, len(data), 4096):
            chunk = data[start:start + 4096]
            if written + len(chunk) > kill_after:
                out.write(chunk[: kill_after - written])
                out.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            out.write(chunk)
            written += len(chunk)
print("complete")
"""


def _kill_points(folder: Path, names: tuple[str, ...]) -> list[int]:
    """Before each file, in the middle of it, and just before the end (the last
    file's final newline alone is not meaningful: JSON without it is complete)."""
    points, offset = [], 0
    for name in names:
        size = (folder / name).stat().st_size
        points += [offset, offset + size // 2]
        offset += size
    return [*points, offset - 2]


def _write(source: Path, target: Path, kill_after: int, names: tuple[str, ...]) -> int:
    """Run the writer in its own process; its return code (-SIGKILL when killed)."""
    argv = [sys.executable, "-c", WRITER, str(source), str(target), str(kill_after), *names]
    return subprocess.run(argv, capture_output=True, check=False).returncode


@pytest.mark.parametrize("kind", ["hf", "ftsup"])
def test_sigkill_during_a_save_never_resumes_from_the_partial_checkpoint(
    pristine: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    source = pristine[kind] / "checkpoint-6"
    names = HF_ORDER + ((MANIFEST_NAME,) if kind == "ftsup" else ())
    for index, kill_after in enumerate([*_kill_points(source, names), -1]):
        out = tmp_path / f"{kind}-{index}"
        shutil.copytree(pristine[kind], out)
        shutil.rmtree(out / "checkpoint-6")
        complete = kill_after < 0
        code = _write(source, out / "checkpoint-6", 10**12 if complete else kill_after, names)
        choice = select_resume(out)
        if complete:  # the writer finished: the new checkpoint is the one
            assert code == 0 and choice.step == 6
            continue
        assert code == -signal.SIGKILL
        assert choice.step == 4, (kill_after, choice)
        assert [*choice.quarantined, *choice.skipped], kill_after


def test_trainer_state_json_round_trip_is_what_the_writer_copies(pristine: dict[str, Path]) -> None:
    """Guard for the test above: HF_ORDER lists every file the Trainer wrote."""
    written = {p.name for p in (pristine["hf"] / "checkpoint-6").iterdir()}
    assert written == set(HF_ORDER)
    json.loads((pristine["hf"] / "checkpoint-6" / "trainer_state.json").read_text())
