"""Exact resume: interrupted and resumed runs end bit-identical to an uninterrupted one.

The schedule crosses epoch boundaries (5 optimizer steps per epoch), uses
gradient accumulation, LoRA dropout (so the RNG state matters) and an eval
split, which are the places where a resume usually drifts.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.manifest import MANIFEST_NAME, read_manifest
from ftsup.trainer.checkpointing import list_checkpoints, newest_complete_checkpoint
from tests.trainer.trainer_helpers import TrainerProcess, step_losses, write_config

MAX_STEPS = 16


def train_table(model: Path, data: Path) -> dict[str, Any]:
    return {
        "model": str(model),
        "dataset": [str(data)],
        "cutoff_len": 64,
        "lora_rank": 4,
        "lora_dropout": 0.1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 5e-3,
        "warmup_steps": 2,
        "max_steps": MAX_STEPS,
        "save_steps": 3,
        "save_total_limit": 2,
        "val_size": 4.0,
        "eval_steps": 5,
        "seed": 7,
    }


@pytest.fixture(scope="module")
def reference(
    tiny_model: Path, arith_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One uninterrupted run: its progress events and final adapter bytes."""
    config = write_config(tmp_path_factory.mktemp("ref"), train_table(tiny_model, arith_data))
    process = TrainerProcess(config)
    try:
        assert process.wait() == 0, process.log()
    finally:
        process.kill_group()
    final = config.parent / "out" / f"checkpoint-{MAX_STEPS}"
    return {
        "events": process.events(),
        "adapter": (final / "adapter_model.safetensors").read_bytes(),
    }


def resume_point(out: Path) -> Path | None:
    """What the supervisor does: the newest checkpoint with a valid manifest."""
    return newest_complete_checkpoint(out)


def assert_matches_reference(events: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    expected = dict(step_losses(reference["events"]))
    assert len(expected) == MAX_STEPS
    for step, loss in step_losses(events):
        assert loss == expected[step], f"step {step}: loss {loss} != reference {expected[step]}"
    ref_evals = {e["step"]: e["eval_loss"] for e in reference["events"] if e["event"] == "eval"}
    for event in events:
        if event["event"] == "eval":
            assert event["eval_loss"] == ref_evals[event["step"]]


@pytest.mark.slow
def test_sigkill_three_times_then_resume_is_bit_exact(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    reference: dict[str, Any],
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    config = write_config(tmp_path / "run", train_table(tiny_model, arith_data))
    out = config.parent / "out"

    # 1. SIGKILL from outside between checkpoints (step 5 ends an epoch).
    first = start_trainer(config)
    first.wait_for_step(5)
    first.wait_for_saved(3)
    first.kill_group()
    resume = resume_point(out)
    # Manifests are written asynchronously: checkpoint 6 may or may not be complete yet.
    assert resume is not None and resume.name in ("checkpoint-3", "checkpoint-6")

    # 2. Killed inside checkpoint 9: HF's files are written, the manifest is not.
    second = start_trainer(
        config,
        resume_from=resume,
        env={"FTSUP_FAULT_AT_STEP": "9", "FTSUP_FAULT_POINT": "before_manifest"},
    )
    assert second.wait() == -signal.SIGKILL, second.log()
    partial = out / "checkpoint-9"
    assert (partial / "adapter_model.safetensors").exists()
    assert not (partial / MANIFEST_NAME).exists()
    resume = resume_point(out)
    assert resume is not None and resume.name in ("checkpoint-3", "checkpoint-6"), resume

    # 3. SIGKILL the moment checkpoint 12's folder appears (mid-write or just after).
    third = start_trainer(config, resume_from=resume)
    third.wait_until(lambda: (out / "checkpoint-12").exists())
    third.kill_group()
    assert list((out).glob("checkpoint-9.invalid-incomplete-*")), "stale checkpoint not retired"
    resume = resume_point(out)
    assert resume is not None and resume.name in ("checkpoint-9", "checkpoint-12")

    last = start_trainer(config, resume_from=resume)
    assert last.wait() == 0, last.log()

    final = out / f"checkpoint-{MAX_STEPS}"
    assert (final / "adapter_model.safetensors").read_bytes() == reference["adapter"]
    assert read_manifest(final).step == MAX_STEPS
    assert_matches_reference(last.events(), reference)
    # Every step after each resume was logged, and each with the reference loss.
    assert {step for step, _ in step_losses(last.events())} == set(range(1, MAX_STEPS + 1))

    # Restarted once more from the last checkpoint (a crash after the final save):
    # nothing is trained past max_steps, and the final weights stay as they were.
    seen = len(last.events())  # the progress file is the config's, shared by attempts
    again = start_trainer(config, resume_from=final)
    assert again.wait() == 0, again.log()
    assert not step_losses(again.events()[seen:])
    assert not (out / f"checkpoint-{MAX_STEPS + 1}").exists()
    assert (final / "adapter_model.safetensors").read_bytes() == reference["adapter"]


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_and_resume_has_no_gap(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    reference: dict[str, Any],
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    config = write_config(tmp_path / "run", train_table(tiny_model, arith_data))
    out = config.parent / "out"

    first = start_trainer(config)
    first.wait_for_step(7)
    first.signal(signal.SIGTERM)
    assert first.wait() == 75, first.log()
    events = first.events()
    stopped_at = [e for e in events if e["event"] == "step"][-1]["step"]
    assert events[-1] == {**events[-1], "event": "train_end", "step": stopped_at}
    assert events[-1]["reason"] == "stopped"
    saved = [e for e in events if e["event"] == "checkpoint_saved"][-1]
    assert saved["step"] == stopped_at and Path(saved["path"]).name == f"checkpoint-{stopped_at}"
    assert newest_complete_checkpoint(out) == out / f"checkpoint-{stopped_at}"
    # Rotation kept save_total_limit complete checkpoints, newest included.
    assert len(list_checkpoints(out)) <= 2

    second = start_trainer(config, resume_from=out / f"checkpoint-{stopped_at}")
    assert second.wait() == 0, second.log()
    all_events = second.events()
    resumed = all_events[len(events) :]
    assert resumed[0]["event"] == "train_start" and resumed[0]["step"] == stopped_at
    assert resumed[0]["resumed_from"] == str(out / f"checkpoint-{stopped_at}")
    steps = [e["step"] for e in all_events if e["event"] == "step"]
    assert steps == list(range(1, MAX_STEPS + 1)), "a step was lost or repeated"
    assert_matches_reference(all_events, reference)
    final = out / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors"
    assert final.read_bytes() == reference["adapter"]


@pytest.mark.slow
def test_sigusr2_saves_and_keeps_training(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    table = {**train_table(tiny_model, arith_data), "save_steps": 100, "max_steps": 8}
    table.pop("eval_steps")
    table["val_size"] = 0.0
    config = write_config(tmp_path / "run", table)
    process = start_trainer(config)
    process.wait_for_step(2)
    process.signal(signal.SIGUSR2)
    assert process.wait() == 0, process.log()
    saves = [e["step"] for e in process.events() if e["event"] == "checkpoint_saved"]
    assert len(saves) == 2 and saves[0] < 8 and saves[1] == 8
    assert newest_complete_checkpoint(config.parent / "out") is not None


@pytest.mark.slow
def test_resume_exactly_at_an_epoch_boundary(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    reference: dict[str, Any],
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    """5 optimizer steps per epoch: checkpoint 10 ends epoch 2, so nothing is skipped on
    resume and HF restores the RNG before building the next epoch's iterator."""
    table = {**train_table(tiny_model, arith_data), "save_steps": 5}
    config = write_config(tmp_path / "run", table, async_save=False)
    out = config.parent / "out"
    crashed = start_trainer(config, env={"FTSUP_FAULT_AT_STEP": "12"})
    assert crashed.wait() == -signal.SIGKILL, crashed.log()
    resume = resume_point(out)
    assert resume is not None and resume.name == "checkpoint-10"
    resumed = start_trainer(config, resume_from=resume)
    assert resumed.wait() == 0, resumed.log()
    final = out / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors"
    assert final.read_bytes() == reference["adapter"]
    assert_matches_reference(resumed.events(), reference)
