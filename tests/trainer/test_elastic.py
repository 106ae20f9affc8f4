"""Elastic world size (issue 15): same global batch, same samples, same losses.

An elastic job's train.json carries `"elastic": {"global_batch": G}`; the trainer
sets its accumulation to G / (per-device batch x world size). The run below
starts on two processes (CPU, gloo), is killed after checkpoint 3, goes on with
one process from that checkpoint, is killed after checkpoint 6, and finishes on
two processes again. Every step's loss must match an uninterrupted
one-process run with the same G: each optimizer step consumes the same
samples at any world size, and a resume at another world size continues at
the exact data position with the optimizer and scheduler state.

Not bit-identical: on two processes the gradient is the all-reduced mean of
two partial sums, on one it is a single sum, so the float rounding differs
(the per-step token normalisation is the same). Hence a tight relative
tolerance; a wrong sample, a skipped or repeated batch, or a lost optimizer
state moves the loss by orders of magnitude more. LoRA dropout is 0: with
dropout, each rank draws its own masks, so the losses would depend on the
rank layout even with the same samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.checkpoints.discovery import select_resume
from ftsup.supervisor.checkpoints.drift_guard import (
    diff_fingerprints,
    drift_refused,
    elastic_summary,
)
from ftsup.supervisor.manifest import read_manifest
from ftsup.supervisor.spec_types import LaunchSection, TrainSection
from ftsup.supervisor.trainer_launch import train_json, write_train_json
from ftsup.trainer.config import ConfigError, at_world_size, load_run_config
from tests.trainer.trainer_helpers import TrainerProcess, step_losses, write_config

MAX_STEPS = 9  # 24 examples / G 8 = 3 steps per epoch: the run crosses two epoch boundaries
PER_DEVICE = 2
GLOBAL_BATCH = 8  # 2 per device x 2 accumulation x 2 processes
TWO = LaunchSection(nproc_per_node=2)
REL_TOL = 1e-5


def train_table(model: Path, data: Path) -> dict[str, Any]:
    return {
        "model": str(model),
        "dataset": [str(data)],
        "cutoff_len": 64,
        "lora_rank": 4,
        "lora_dropout": 0.0,
        "per_device_train_batch_size": PER_DEVICE,
        "gradient_accumulation_steps": 2,  # the full-size value; elastic overrides it
        "learning_rate": 5e-3,
        "warmup_steps": 2,
        "max_steps": MAX_STEPS,
        "save_steps": 3,
        "save_total_limit": 5,
        "seed": 5,
    }


def write_elastic_config(run_dir: Path, train: dict[str, Any], global_batch: int) -> Path:
    """A daemon-style train.json plus the elastic key (synchronous saves: a kill
    after step N+1 always finds checkpoint N sealed)."""
    config = write_config(run_dir, train, async_save=False)
    payload = json.loads(config.read_text())
    payload["elastic"] = {"global_batch": global_batch}
    config.write_text(json.dumps(payload, indent=1))
    return config


def kill_after(step: int) -> dict[str, str]:
    """Every rank SIGKILLs itself when `step` ends, before reporting or saving it."""
    return {"FTSUP_FAULT_AT_STEP": str(step)}


def attempt(process: TrainerProcess) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    """This process's train_start event and its per-step losses."""
    events = process.own_events()
    starts = [e for e in events if e["event"] == "train_start"]
    assert len(starts) == 1, process.log()
    return starts[0], step_losses(events)


def assert_close(got: list[tuple[int, float]], expected: dict[int, float]) -> None:
    for step, loss in got:
        assert math.isclose(loss, expected[step], rel_tol=REL_TOL), (
            f"step {step}: loss {loss} != one-process reference {expected[step]}"
        )


@pytest.mark.slow
def test_two_to_one_to_two_processes_keeps_batch_and_losses(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    table = train_table(tiny_model, arith_data)
    ref_config = write_elastic_config(tmp_path / "ref", table, GLOBAL_BATCH)
    reference = start_trainer(ref_config)
    assert reference.wait() == 0, reference.log()
    ref_start, ref_losses = attempt(reference)
    assert (ref_start["world_size"], ref_start["gradient_accumulation_steps"]) == (1, 4)
    expected = dict(ref_losses)
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))
    # The losses must tell steps apart, or matching them would prove nothing.
    assert len({round(loss, 4) for loss in expected.values()}) == MAX_STEPS

    config = write_elastic_config(tmp_path / "run", table, GLOBAL_BATCH)
    out = config.parent / "out"

    # Two processes, accumulation 2: killed when step 4 ends, checkpoint 3 is sealed.
    first = start_trainer(config, launch=TWO, env=kill_after(4))
    assert first.wait() != 0, first.log()
    start, losses = attempt(first)
    assert (start["world_size"], start["gradient_accumulation_steps"]) == (2, 2)
    assert [step for step, _ in losses] == [1, 2, 3]
    assert_close(losses, expected)

    # One GPU lost: the daemon resumes checkpoint 3 on one process (accumulation 4).
    choice = select_resume(out, world_size=1, quarantine=False)
    assert choice.checkpoint is not None and choice.checkpoint.path.name == "checkpoint-3"
    assert read_manifest(choice.checkpoint.path).world_size == 2
    second = start_trainer(config, resume_from=choice.checkpoint.path, env=kill_after(7))
    assert second.wait() != 0, second.log()
    start, losses = attempt(second)
    assert (start["step"], start["world_size"], start["gradient_accumulation_steps"]) == (3, 1, 4)
    assert [step for step, _ in losses] == [4, 5, 6]
    assert_close(losses, expected)
    assert "elastic resume" in second.log() and "world size 2 -> 1" in second.log()

    # The GPU is back: checkpoint 6, written by one process, resumes on two.
    choice = select_resume(out, world_size=2, quarantine=False)
    assert choice.checkpoint is not None and choice.checkpoint.path.name == "checkpoint-6"
    six = read_manifest(choice.checkpoint.path)
    assert six.world_size == 1
    drifts = diff_fingerprints(read_manifest(out / "checkpoint-3").fingerprint, six.fingerprint)
    assert {d.key for d in drifts} == {"world_size", "gradient_accumulation_steps"}
    assert not drift_refused(drifts)
    assert elastic_summary(read_manifest(out / "checkpoint-3").fingerprint, six.fingerprint) == (
        "world size 2 -> 1, accumulation 2 -> 4, global batch 8 kept"
    )
    third = start_trainer(config, launch=TWO, resume_from=choice.checkpoint.path)
    assert third.wait() == 0, third.log()
    assert "world size 1 -> 2, accumulation 4 -> 2, global batch 8 kept" in third.log()
    start, losses = attempt(third)
    assert (start["step"], start["world_size"], start["gradient_accumulation_steps"]) == (6, 2, 2)
    assert [step for step, _ in losses] == [7, 8, 9]
    assert_close(losses, expected)
    final = read_manifest(out / f"checkpoint-{MAX_STEPS}")
    assert final.world_size == 2 and final.fingerprint["global_batch"] == GLOBAL_BATCH


def test_a_global_batch_the_world_size_cannot_keep_is_a_config_error(
    tiny_model: Path, arith_data: Path, tmp_path: Path
) -> None:
    """G = 3 with 2 per device: 1.5 accumulation steps; exit 2, no training."""
    config = write_elastic_config(tmp_path / "bad", train_table(tiny_model, arith_data), 3)
    process = TrainerProcess(config)
    try:
        assert process.wait() == 2, process.log()
    finally:
        process.kill_group()
    assert "elastic global batch 3 cannot be kept on 1 process(es)" in process.log()
    assert not (config.parent / "out").exists() or not list((config.parent / "out").iterdir())


def test_train_json_carries_the_global_batch_and_the_trainer_derives_accumulation(
    tiny_model: Path, arith_data: Path, tmp_path: Path
) -> None:
    train = TrainSection(
        model=str(tiny_model),
        dataset=(str(arith_data),),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
    )
    assert "elastic" not in train_json(train, output_dir=tmp_path / "out")
    path = write_train_json(
        tmp_path / "train.json", train, output_dir=tmp_path / "out", elastic_global_batch=16
    )
    assert json.loads(path.read_text())["elastic"] == {"global_batch": 16}
    config = load_run_config(path, check_files=False)
    assert config.elastic_global_batch == 16
    accumulations = [
        at_world_size(config, w).train.gradient_accumulation_steps for w in (1, 2, 4, 8)
    ]
    assert accumulations == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match="cannot be kept on 3 process"):
        at_world_size(config, 3)
    plain = load_run_config(
        write_train_json(tmp_path / "plain.json", train, output_dir=tmp_path / "out"),
        check_files=False,
    )
    assert plain.elastic_global_batch is None
    assert at_world_size(plain, 2) == plain  # not elastic: nothing changes


@pytest.mark.parametrize("value", [{"global_batch": 0}, {"global_batch": "8"}, {}, 8, True])
def test_a_malformed_elastic_key_is_a_config_error(
    value: object, tiny_model: Path, arith_data: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, train_table(tiny_model, arith_data))
    payload = json.loads(config.read_text())
    payload["elastic"] = value
    config.write_text(json.dumps(payload))
    with pytest.raises(ConfigError, match="`elastic` must be"):
        load_run_config(config, check_files=False)
