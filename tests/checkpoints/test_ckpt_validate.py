"""Validation of real checkpoints: every layout intact, then the corruption matrix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftsup.supervisor.checkpoints.discovery import select_resume
from ftsup.supervisor.checkpoints.report import CheckpointReport
from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.checksums import DEFAULT_ALGORITHM

from .builders import DAMAGE, flip_bit, truncate
from .conftest import Factory

KINDS = ("hf", "hf2", "ftsup", "ftsup2", "sharded", "deepspeed", "hf_deepspeed")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("deep", [False, True])
def test_pristine_checkpoints_are_valid_and_resumable(
    pristine: dict[str, Path], kind: str, deep: bool
) -> None:
    for step in (2, 4, 6):
        report = validate_checkpoint(pristine[kind] / f"checkpoint-{step}", deep=deep)
        assert report.valid, report.reason
        assert report.resumable, report.reason
        assert report.reason is None
        assert report.step == step
        assert report.size_bytes > 0 and report.mtime > 0


def test_formats_are_recognised(pristine: dict[str, Path]) -> None:
    formats = {k: validate_checkpoint(pristine[k] / "checkpoint-2").format for k in KINDS}
    assert formats == {
        "hf": "hf",
        "hf2": "hf",
        "ftsup": "ftsup",
        "ftsup2": "ftsup",
        "sharded": "hf",
        "deepspeed": "deepspeed",
        "hf_deepspeed": "deepspeed",
    }


def test_world_size_is_inferred(pristine: dict[str, Path]) -> None:
    assert validate_checkpoint(pristine["hf"] / "checkpoint-2").details["world_size"] == 1
    assert validate_checkpoint(pristine["hf2"] / "checkpoint-2").details["world_size"] == 2
    assert validate_checkpoint(pristine["deepspeed"] / "checkpoint-2").details["world_size"] == 2


def test_report_carries_metrics_and_serialises(pristine: dict[str, Path]) -> None:
    report = validate_checkpoint(pristine["hf"] / "checkpoint-4")
    assert report.details["global_step"] == 4
    assert "loss" in report.details["metrics"]
    data = json.loads(json.dumps(report.to_json()))
    assert data["valid"] is True and data["step"] == 4 and data["format"] == "hf"


# -- HF Trainer corruption matrix ---------------------------------------------

# file -> damage -> expected reason (prefix)
HF_MATRIX = {
    "model.safetensors": {
        "truncated": "model.safetensors truncated: the header says",
        "zero-length": "model.safetensors is empty (0 bytes)",
        "deleted": "no model weights",
    },
    "optimizer.pt": {
        "truncated": "optimizer.pt truncated: central directory missing",
        "zero-length": "optimizer.pt is empty (0 bytes)",
        "deleted": "optimizer.pt missing",
        "bit-flipped": "optimizer.pt corrupt: CRC mismatch in member",
    },
    "scheduler.pt": {
        "truncated": "scheduler.pt truncated: central directory missing",
        "zero-length": "scheduler.pt is empty (0 bytes)",
        "deleted": "scheduler.pt missing",
        "bit-flipped": "scheduler.pt corrupt: CRC mismatch in member",
    },
    "rng_state.pth": {
        "truncated": "rng_state.pth truncated: central directory missing",
        "zero-length": "rng_state.pth is empty (0 bytes)",
        "deleted": "rng_state.pth missing",
        "bit-flipped": "rng_state.pth corrupt: CRC mismatch in member",
    },
    "trainer_state.json": {
        "truncated": "trainer_state.json unparseable",
        "zero-length": "trainer_state.json is empty (0 bytes)",
        "deleted": "trainer_state.json missing (the trainer writes it last",
    },
}
HF_CASES = [(f, d, r) for f, cases in HF_MATRIX.items() for d, r in cases.items()]


def _assert_falls_back(
    out: Path, reason: str, *, deep: bool = False, world_size: int | None = None
) -> None:
    choice = select_resume(out, deep=deep, world_size=world_size)
    assert choice.step == 4
    assert choice.checkpoint is not None and choice.checkpoint.resumable
    assert [q.report.path.name for q in choice.quarantined] == ["checkpoint-6"]
    assert choice.quarantined[0].report.reason is not None
    assert choice.quarantined[0].report.reason.startswith(reason)
    moved = choice.quarantined[0].moved_to
    assert moved.name.startswith("checkpoint-6.invalid-") and moved.is_dir()
    assert not (out / "checkpoint-6").exists()
    # the next resume sees the same answer without quarantining again
    again = select_resume(out, deep=deep, world_size=world_size)
    assert again.step == 4 and again.quarantined == ()


@pytest.mark.parametrize(("name", "damage", "reason"), HF_CASES)
def test_hf_corruption_is_detected_and_skipped(
    output_dir: Factory, name: str, damage: str, reason: str
) -> None:
    out = output_dir("hf")
    DAMAGE[damage](out / "checkpoint-6" / name)
    deep = damage == "bit-flipped"
    if deep:  # a flipped payload bit is invisible to the fast path
        assert validate_checkpoint(out / "checkpoint-6").valid
    report = validate_checkpoint(out / "checkpoint-6", deep=deep)
    assert not report.valid and not report.resumable
    assert report.reason is not None and report.reason.startswith(reason), report.reason
    _assert_falls_back(out, reason, deep=deep)


def test_hf_safetensors_payload_flip_is_invisible_without_a_manifest(output_dir: Factory) -> None:
    """safetensors has no checksums: only an ftsup manifest hash sees this."""
    out = output_dir("hf")
    flip_bit(out / "checkpoint-6" / "model.safetensors")
    assert validate_checkpoint(out / "checkpoint-6", deep=True).valid


@pytest.mark.parametrize("damage", ["truncated", "zero-length", "deleted"])
def test_sharded_weights_damage(output_dir: Factory, damage: str) -> None:
    out = output_dir("sharded")
    DAMAGE[damage](out / "checkpoint-6" / "model-00002-of-00002.safetensors")
    report = validate_checkpoint(out / "checkpoint-6")
    expected = {
        "truncated": "model-00002-of-00002.safetensors truncated",
        "zero-length": "model-00002-of-00002.safetensors is empty (0 bytes)",
        "deleted": (
            "model-00002-of-00002.safetensors missing (named by model.safetensors.index.json)"
        ),
    }[damage]
    assert report.reason is not None and report.reason.startswith(expected), report.reason


def test_incomplete_marker(output_dir: Factory) -> None:
    out = output_dir("hf")
    (out / "checkpoint-6" / "checkpoint-is-incomplete.txt").write_text("")
    reason = "checkpoint-is-incomplete.txt present"
    assert (validate_checkpoint(out / "checkpoint-6").reason or "").startswith(reason)
    _assert_falls_back(out, reason)


def test_global_step_mismatch(output_dir: Factory) -> None:
    out = output_dir("hf")
    state_file = out / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["global_step"] = 5
    state_file.write_text(json.dumps(state))
    reason = "trainer_state.json says global_step 5, the folder is checkpoint-6"
    assert validate_checkpoint(out / "checkpoint-6").reason == reason
    _assert_falls_back(out, reason)


@pytest.mark.parametrize("world_size", [None, 2])
def test_rng_file_missing_for_rank_1_of_2(output_dir: Factory, world_size: int | None) -> None:
    out = output_dir("hf2")
    (out / "checkpoint-6" / "rng_state_1.pth").unlink()
    report = validate_checkpoint(out / "checkpoint-6", world_size=world_size)
    assert report.reason == "rng_state_1.pth missing (world size 2)"
    _assert_falls_back(out, "rng_state_1.pth missing")


def test_world_size_argument_raises_the_expected_ranks(pristine: dict[str, Path]) -> None:
    report = validate_checkpoint(pristine["hf2"] / "checkpoint-6", world_size=4)
    assert report.reason == "rng_state_2.pth missing (world size 4)"
    single = validate_checkpoint(pristine["hf"] / "checkpoint-6", world_size=2)
    assert single.valid  # written by one process: drift, not damage
    assert any("written by one process" in n for n in single.notes)


def test_weights_only_is_valid_but_not_resumable(output_dir: Factory) -> None:
    out = output_dir("weights_only")
    report = validate_checkpoint(out / "checkpoint-6")
    assert report.valid and not report.resumable
    assert report.reason is not None and report.reason.startswith("weights only")
    choice = select_resume(out)
    assert choice.checkpoint is None
    assert choice.quarantined == ()  # nothing wrong with them: never renamed
    assert [r.step for r in choice.skipped] == [6, 4, 2]


def test_empty_and_unknown_folders(tmp_path: Path) -> None:
    empty = tmp_path / "checkpoint-3"
    empty.mkdir()
    assert validate_checkpoint(empty).reason == "empty folder (nothing written yet)"
    (empty / "notes.txt").write_text("hi")
    report = validate_checkpoint(empty)
    assert report.format == "unknown" and not report.valid
    with pytest.raises(FileNotFoundError):
        validate_checkpoint(tmp_path / "nope")


# -- ftsup (manifest) corruption matrix ---------------------------------------

FTSUP_FILES = (
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
)


@pytest.mark.parametrize("name", FTSUP_FILES)
@pytest.mark.parametrize("damage", ["truncated", "zero-length", "deleted", "bit-flipped"])
def test_ftsup_corruption_is_detected(output_dir: Factory, name: str, damage: str) -> None:
    out = output_dir("ftsup")
    size = (out / "checkpoint-6" / name).stat().st_size
    DAMAGE[damage](out / "checkpoint-6" / name)
    expected = {
        "truncated": f"{name} is {size // 2} bytes, the manifest says {size} (truncated)",
        "zero-length": f"{name} is 0 bytes, the manifest says {size} (truncated)",
        "deleted": f"{name} listed in the manifest is missing",
        "bit-flipped": f"{name} content differs from the manifest ({DEFAULT_ALGORITHM} mismatch)",
    }[damage]
    deep = damage == "bit-flipped"
    if deep:
        assert validate_checkpoint(out / "checkpoint-6").valid
    report = validate_checkpoint(out / "checkpoint-6", deep=deep)
    assert report.format == "ftsup"
    assert report.reason == expected
    _assert_falls_back(out, expected, deep=deep)


def test_ftsup_manifest_missing(output_dir: Factory) -> None:
    out = output_dir("ftsup")
    (out / "checkpoint-6" / "ftsup-manifest.json").unlink()
    # alone, the folder is a good HF checkpoint; its siblings say a manifest is due
    assert validate_checkpoint(out / "checkpoint-6").valid
    report = validate_checkpoint(out / "checkpoint-6", require_manifest=True)
    assert report.reason == "ftsup-manifest.json missing (checkpoint incomplete)"
    _assert_falls_back(out, "ftsup-manifest.json missing")


def test_ftsup_manifest_being_written(output_dir: Factory) -> None:
    out = output_dir("ftsup")
    manifest = out / "checkpoint-6" / "ftsup-manifest.json"
    manifest.rename(manifest.with_name("ftsup-manifest.json.tmp-123"))
    report = validate_checkpoint(out / "checkpoint-6")
    assert report.format == "ftsup"
    assert report.reason is not None and "interrupted" in report.reason


def test_ftsup_manifest_names_a_missing_file(output_dir: Factory) -> None:
    out = output_dir("ftsup")
    path = out / "checkpoint-6" / "ftsup-manifest.json"
    data = json.loads(path.read_text())
    data["files"].append({"path": "extra_state.pt", "size": 10, "sha256": "0" * 64})
    path.write_text(json.dumps(data))
    reason = "extra_state.pt listed in the manifest is missing"
    assert validate_checkpoint(out / "checkpoint-6").reason == reason
    _assert_falls_back(out, reason)


def test_ftsup_manifest_truncated(output_dir: Factory) -> None:
    out = output_dir("ftsup")
    truncate(out / "checkpoint-6" / "ftsup-manifest.json")
    reason = "ftsup-manifest.json unreadable"
    assert (validate_checkpoint(out / "checkpoint-6").reason or "").startswith(reason)
    _assert_falls_back(out, reason)


def test_ftsup_uses_the_manifest_world_size(output_dir: Factory) -> None:
    out = output_dir("ftsup2")
    (out / "checkpoint-6" / "rng_state_1.pth").unlink()
    report = validate_checkpoint(out / "checkpoint-6")
    assert report.reason == "rng_state_1.pth listed in the manifest is missing"
    assert "rng_state_1.pth missing (world size 2)" in report.problems
    assert report.details["fingerprint"]["world_size"] == 2


# -- DeepSpeed ------------------------------------------------------------------


def test_deepspeed_latest_points_at_a_missing_folder(output_dir: Factory) -> None:
    out = output_dir("deepspeed")
    (out / "checkpoint-6" / "latest").write_text("global_step7")
    reason = "latest names global_step7, which is missing"
    assert validate_checkpoint(out / "checkpoint-6").reason == reason
    _assert_falls_back(out, reason)


def test_deepspeed_latest_missing(output_dir: Factory) -> None:
    out = output_dir("deepspeed")
    (out / "checkpoint-6" / "latest").unlink()
    reason = "latest missing (DeepSpeed writes it last: the save did not finish)"
    assert validate_checkpoint(out / "checkpoint-6").reason == reason
    _assert_falls_back(out, reason)


def test_deepspeed_optimizer_rank_missing(output_dir: Factory) -> None:
    out = output_dir("deepspeed")
    (
        out / "checkpoint-6" / "global_step6" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    ).unlink()
    reason = "global_step6/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt missing (rank 1 of 2)"
    assert validate_checkpoint(out / "checkpoint-6", world_size=2).reason == reason
    # the highest rank's loss is only visible when the world size is known
    assert validate_checkpoint(out / "checkpoint-6").valid
    _assert_falls_back(out, reason, world_size=2)


def test_deepspeed_optimizer_gap_needs_no_world_size(output_dir: Factory) -> None:
    out = output_dir("deepspeed")
    step_dir = out / "checkpoint-6" / "global_step6"
    (step_dir / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").rename(
        step_dir / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    )
    report = validate_checkpoint(out / "checkpoint-6")
    assert report.reason == (
        "global_step6/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt missing (rank 1 of 3)"
    )


@pytest.mark.parametrize("damage", ["truncated", "zero-length", "deleted"])
def test_deepspeed_model_states_damage(output_dir: Factory, damage: str) -> None:
    out = output_dir("deepspeed")
    DAMAGE[damage](out / "checkpoint-6" / "global_step6" / "mp_rank_00_model_states.pt")
    expected = {
        "truncated": "global_step6/mp_rank_00_model_states.pt truncated: central directory missing",
        "zero-length": "global_step6/mp_rank_00_model_states.pt is empty (0 bytes)",
        "deleted": "global_step6 has no model states (mp_rank_*_model_states.pt)",
    }[damage]
    assert validate_checkpoint(out / "checkpoint-6").reason == expected
    _assert_falls_back(out, expected)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("trainer_state.json", "trainer_state.json missing (the trainer writes it last"),
        ("rng_state.pth", "rng_state.pth missing"),
        ("latest", "latest missing (DeepSpeed writes it last"),
    ],
)
def test_hf_with_deepspeed_needs_both_markers(output_dir: Factory, name: str, reason: str) -> None:
    out = output_dir("hf_deepspeed")
    (out / "checkpoint-6" / name).unlink()
    report = validate_checkpoint(out / "checkpoint-6")
    assert report.reason is not None and report.reason.startswith(reason), report.reason
    _assert_falls_back(out, reason)


@pytest.mark.parametrize("kind", ["ftsup", "hf", "deepspeed"])
@pytest.mark.parametrize("how", ["whole folder", "first file"])
def test_a_folder_deleted_while_being_checked_is_gone_not_invalid(
    output_dir: Factory, kind: str, how: str
) -> None:
    """Issue 12, defect 10: the trainer's rotation (rmtree: files first, then the
    folder) ran while ftsup validated. Deterministic: the deletion happens at
    the seam right after the folder's contents were listed."""
    import shutil

    folder = output_dir(kind) / "checkpoint-4"

    def rotate(path: Path) -> None:
        if how == "whole folder":
            shutil.rmtree(path)
        else:  # rmtree caught half-way: one listed file already gone
            files = [p for p in path.rglob("*") if p.is_file()]
            max(files, key=lambda p: p.stat().st_size).unlink()  # one that matters

    with pytest.raises(FileNotFoundError, match="disappeared while being checked"):
        validate_checkpoint(folder, on_listed=rotate)


def test_a_file_missing_from_the_start_is_still_invalid(output_dir: Factory) -> None:
    """The counterpart: a manifest-listed file absent before the check began."""
    folder = output_dir("ftsup") / "checkpoint-4"
    (folder / "optimizer.pt").unlink()
    report = validate_checkpoint(folder)
    assert not report.valid and report.checked
    assert report.reason == "optimizer.pt listed in the manifest is missing"


def test_a_name_with_a_trailing_newline_is_not_a_checkpoint(output_dir: Factory) -> None:
    from ftsup.supervisor.checkpoints.discovery import list_checkpoints
    from ftsup.supervisor.checkpoints.report import checkpoint_step

    out = output_dir("hf")
    odd = out / "checkpoint-8\n"
    odd.mkdir()
    assert checkpoint_step(odd) is None
    assert [p.name for p in list_checkpoints(out)] == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


def test_a_fifo_in_a_checkpoint_is_a_finding_not_a_hang(output_dir: Factory) -> None:
    """Issue 12, defect 1: validation opens nothing that could block."""
    import os

    out = output_dir("hf")
    state = out / "checkpoint-6" / "trainer_state.json"
    state.unlink()
    os.mkfifo(state)
    fifo_weights = out / "checkpoint-4" / "model.safetensors"
    fifo_weights.unlink()
    os.mkfifo(fifo_weights)
    import threading

    reports: dict[str, CheckpointReport] = {}

    def judge() -> None:  # in a thread: at 97b360c the open() blocks for ever
        for name in ("checkpoint-6", "checkpoint-4"):
            reports[name] = validate_checkpoint(out / name)

    worker = threading.Thread(target=judge, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "validation blocked on a FIFO"
    six, four = reports["checkpoint-6"], reports["checkpoint-4"]
    assert six.checked and not six.valid
    assert six.reason == "trainer_state.json is a FIFO, not a regular file"
    assert four.checked and not four.valid
    assert "model.safetensors is a FIFO, not a regular file" in four.problems
    assert select_resume(out, quarantine=False).path == out / "checkpoint-2"
