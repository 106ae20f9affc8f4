"""DeepSpeed ZeRO-2/3 full fine-tuning in the built-in trainer (issue 16): real runs on CPU.

Two processes under ftsup's torchrun wrapper, `[launch] deepspeed = "zero2"`
or `"zero3"`, through HF Trainer's own DeepSpeed integration. For each stage:
an uninterrupted run, and a run killed after a sealed checkpoint, resumed by
the checkpoint the supervisor selects. The final weights must be bit-identical.
DeepSpeed on CPU with one thread per process is deterministic: the killed
run's losses before its kill repeat the reference's bit for bit (two runs
from scratch), so no tolerance is needed. Both kills are one rank dying
*during* a save of step 4, after checkpoint 2 was sealed: in the ZeRO-2 run
rank 0, with every file written, before the manifest; in the ZeRO-3 run rank
1, with its shards written, before it confirmed them to rank 0's seal. Such a
checkpoint must never be resumed. The checkpoints these runs
wrote are then damaged in the ways real failures do (a missing or truncated
rank shard, a `latest` ahead of its shards) and must be refused.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.checkpoints.discovery import select_resume
from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.manifest import MANIFEST_NAME, read_manifest
from ftsup.supervisor.spec_types import LaunchSection
from ftsup.trainer.tiny import build_arithmetic_dataset, build_tiny_model
from tests.trainer.trainer_helpers import (
    TrainerProcess,
    full_train_table,
    step_losses,
    write_config,
)

pytestmark = pytest.mark.slow  # trains real models: starts first (tests/conftest.py)

MAX_STEPS = 6
SAVE_STEPS = 2


@dataclass
class Runs:
    """One stage's reference run and its killed-then-resumed twin."""

    reference: Path  # output folder
    resumed: Path
    killed_log: str
    killed_losses: list[tuple[int, float]]
    resumed_from: Path
    resumed_losses: list[tuple[int, float]]
    reference_losses: list[tuple[int, float]]
    resumed_start_step: int


def run(
    run_dir: Path, train: dict[str, Any], stage: str, *, async_save: bool, **kwargs: Any
) -> TrainerProcess:
    config = write_config(run_dir, train, async_save=async_save)
    process = TrainerProcess(
        config, launch=LaunchSection(nproc_per_node=2, deepspeed=stage), **kwargs
    )
    try:
        process.wait(timeout=180)
    finally:
        process.kill_group()
    return process


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ds-inputs")
    model = build_tiny_model(base / "model", seed=0, hidden=32)
    return model, build_arithmetic_dataset(base / "arith.jsonl", 24, seed=1)


def exact_resume_runs(
    base: Path, inputs: tuple[Path, Path], stage: str, kill_env: dict[str, str], async_save: bool
) -> Runs:
    train = full_train_table(*inputs, max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
    reference = run(base / "ref", train, stage, async_save=async_save)
    assert reference.proc.returncode == 0, reference.log()
    killed = run(base / "run", train, stage, async_save=async_save, env=kill_env)
    assert killed.proc.returncode != 0, killed.log()
    killed_losses = step_losses(killed.own_events())  # before the resume appends to the file
    out = base / "run" / "out"
    choice = select_resume(out, world_size=2, quarantine=False)
    assert choice.checkpoint is not None, killed.log()
    resumed = run(
        base / "run", train, stage, async_save=async_save, resume_from=choice.checkpoint.path
    )
    assert resumed.proc.returncode == 0, resumed.log()
    starts = [e for e in resumed.own_events() if e["event"] == "train_start"]
    return Runs(
        reference=base / "ref" / "out",
        resumed=out,
        killed_log=killed.log(tail=None),
        killed_losses=killed_losses,
        resumed_from=choice.checkpoint.path,
        resumed_losses=step_losses(resumed.own_events()),
        reference_losses=step_losses(reference.events()),
        resumed_start_step=starts[0]["step"],
    )


@pytest.fixture(scope="module")
def zero2(tmp_path_factory: pytest.TempPathFactory, inputs: tuple[Path, Path]) -> Runs:
    # Rank 0 is SIGKILLed while saving step 4: every file written, no manifest yet.
    kill = {"FTSUP_FAULT_AT_STEP": "4", "FTSUP_FAULT_POINT": "before_manifest"}
    return exact_resume_runs(tmp_path_factory.mktemp("zero2"), inputs, "zero2", kill, True)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory, inputs: tuple[Path, Path]) -> Runs:
    # Rank 1 alone is SIGKILLed while saving step 4 (synchronous seal): its shards
    # are on disk, their checksums never reached rank 0; torchrun ends rank 0.
    kill = {"FTSUP_FAULT_AT_STEP": "4", "FTSUP_FAULT_POINT": "before_handover"}
    kill["FTSUP_FAULT_RANK"] = "1"
    return exact_resume_runs(tmp_path_factory.mktemp("zero3"), inputs, "zero3", kill, False)


def final_weights(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / f"checkpoint-{MAX_STEPS}" / "model.safetensors"))


def assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert sorted(a) == sorted(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ from the uninterrupted run: {different}"


def shard_names(ckpt: Path) -> list[str]:
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.glob("global_step*/*.pt"))


def assert_repeats_reference(runs: Runs, last_step: int) -> None:
    """The killed run (from scratch) matched the reference bit for bit up to its kill."""
    assert [step for step, _ in runs.killed_losses] == list(range(1, last_step + 1))
    assert runs.killed_losses == runs.reference_losses[:last_step]


def test_zero2_resume_after_a_rank_died_during_a_save_is_exact(zero2: Runs) -> None:
    assert_repeats_reference(zero2, 4)
    # The save of step 4 never sealed: the supervisor resumes checkpoint 2.
    assert zero2.resumed_from.name == "checkpoint-2", zero2.killed_log
    assert zero2.resumed_start_step == 2
    assert [step for step, _ in zero2.resumed_losses] == [3, 4, 5, 6]
    # The abandoned checkpoint-4 was moved away, never mixed into the new one.
    retired = [p.name for p in zero2.resumed.iterdir() if p.name.startswith("checkpoint-4.")]
    assert retired and retired[0].startswith("checkpoint-4.invalid-incomplete"), retired
    assert dict(zero2.resumed_losses) == {
        step: loss for step, loss in zero2.reference_losses if step > 2
    }
    assert_identical(final_weights(zero2.resumed), final_weights(zero2.reference))
    manifest = read_manifest(zero2.resumed / f"checkpoint-{MAX_STEPS}")
    listed = {entry.path for entry in manifest.files}
    assert set(shard_names(zero2.resumed / f"checkpoint-{MAX_STEPS}")) <= listed
    assert {
        "global_step6/mp_rank_00_model_states.pt",
        "global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    } <= listed
    assert "asynchronous save is off" in zero2.killed_log


def test_zero3_resume_after_rank_1_died_during_a_save_is_exact(zero3: Runs) -> None:
    assert_repeats_reference(zero3, 4)
    # Rank 1 wrote its shards of step 4 and died before confirming them: rank 0
    # never sealed checkpoint 4, and the supervisor resumes checkpoint 2.
    (retired,) = [p for p in zero3.resumed.iterdir() if p.name.startswith("checkpoint-4.")]
    assert retired.name.startswith("checkpoint-4.invalid-incomplete"), retired
    assert (retired / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert not (retired / MANIFEST_NAME).exists()
    assert zero3.resumed_from.name == "checkpoint-2", zero3.killed_log
    assert zero3.resumed_start_step == 2
    assert [step for step, _ in zero3.resumed_losses] == [3, 4, 5, 6]
    assert zero3.resumed_losses == zero3.reference_losses[2:]
    assert_identical(final_weights(zero3.resumed), final_weights(zero3.reference))
    ckpt = zero3.resumed / f"checkpoint-{MAX_STEPS}"
    listed = {entry.path for entry in read_manifest(ckpt).files}
    # ZeRO-3: model and optimizer states per rank, all in the manifest.
    assert shard_names(ckpt) == sorted(
        f"global_step6/zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
        for rank in (0, 1)
        for kind in ("model", "optim")
    )
    assert set(shard_names(ckpt)) <= listed


@pytest.fixture
def copies(zero2: Runs, zero3: Runs, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Fresh copies of real sealed checkpoints (step 4) to damage."""
    result = {}
    for name, runs in (("zero2", zero2), ("zero3", zero3)):
        target = tmp_path / name / "checkpoint-4"
        shutil.copytree(runs.reference / "checkpoint-4", target)
        result[name] = target
    yield result


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_real_checkpoints_validate_and_damage_is_refused(
    copies: dict[str, Path], stage: str
) -> None:
    ckpt = copies[stage]
    report = validate_checkpoint(ckpt, require_manifest=True, world_size=2)
    assert report.valid and report.resumable, report
    assert report.format == "ftsup"

    shard = ckpt / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated rank-1 shard
    report = validate_checkpoint(ckpt, require_manifest=True, world_size=2)
    assert not report.valid and "zero_pp_rank_1" in "\n".join(report.problems), report
    # Without the manifest (a foreign run), DeepSpeed's own structure says it too.
    (ckpt / MANIFEST_NAME).unlink()
    report = validate_checkpoint(ckpt, world_size=2)
    assert not report.valid and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in str(report.reason), (
        report
    )
    shard.unlink()  # missing rank-1 shard
    # Also when the job says 1 (a [command] job's world size is torchrun's, not
    # ftsup's) or nothing: rank 1's RNG file says two ranks wrote it.
    for world_size in (2, 1, None):
        report = validate_checkpoint(ckpt, world_size=world_size)
        assert not report.valid and "zero_pp_rank_1_mp_rank_00_optim_states.pt missing" in str(
            report.reason
        ), (world_size, report)


def test_zero3_missing_model_states_of_one_rank_is_refused(copies: dict[str, Path]) -> None:
    """ZeRO-3 writes model states per rank; a rank's missing file is seen without a
    world size (the other kind of file names the rank) and without a manifest."""
    ckpt = copies["zero3"]
    (ckpt / MANIFEST_NAME).unlink()
    assert validate_checkpoint(ckpt).valid
    (ckpt / "global_step4" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    report = validate_checkpoint(ckpt)
    assert not report.valid
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt missing" in "\n".join(report.problems), report


def test_a_latest_ahead_of_its_shards_is_refused(copies: dict[str, Path]) -> None:
    """Rank 0 writes `latest` without waiting for the others: a `latest` naming a
    tag whose shards are not all there, or another step's tag, is refused."""
    ckpt = copies["zero2"]
    (ckpt / MANIFEST_NAME).unlink()
    tag = ckpt / "global_step6"
    tag.mkdir()
    shutil.copy(ckpt / "global_step4" / "mp_rank_00_model_states.pt", tag)
    shutil.copy(ckpt / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tag)
    (ckpt / "latest").write_text("global_step6")
    report = validate_checkpoint(ckpt, world_size=2)
    assert not report.valid
    reason = "\n".join(report.problems)
    assert "global_step6" in reason and "step 4" in reason, report
    report = validate_checkpoint(ckpt, world_size=2)
    assert any("zero_pp_rank_1_mp_rank_00_optim_states.pt missing" in p for p in report.problems)


def test_export_consolidates_a_checkpoint_that_holds_only_zero_shards(
    zero3: Runs, tmp_path: Path
) -> None:
    """`ftsup export` of a ZeRO-3 checkpoint without gathered weights (a config with
    stage3_gather_16bit_weights_on_model_save = false): the rank shards are merged
    into a standalone model equal to the gathered weights the trainer saved."""
    from transformers import AutoModelForCausalLM

    from ftsup.trainer.export import export_model

    final = zero3.resumed / f"checkpoint-{MAX_STEPS}"
    shards_only = tmp_path / final.name
    shutil.copytree(final, shards_only)
    (shards_only / "model.safetensors").unlink()
    out = export_model(shards_only, None, tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    exported = {k: v for k, v in model.state_dict().items()}
    saved = final_weights(zero3.resumed)
    for name, tensor in saved.items():
        assert name in exported, name
        assert exported[name].equal(tensor.to(exported[name].dtype)), name
