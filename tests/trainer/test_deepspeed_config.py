"""`[launch] deepspeed`: built-in names, a PATH's batch keys, the trainer's command line.

The same batch-key check runs in `ftsup check` (spec time) and in the trainer
(exit 2), so a configuration that disagrees with `[train]` never trains with
a global batch other than the one the fingerprint and the resume assume.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.spec import SpecError, parse_spec
from ftsup.supervisor.spec_types import LaunchSection
from ftsup.supervisor.trainer_launch import DISTRUN_MODULE, build_trainer_argv
from ftsup.trainer.deepspeed_configs import (
    BATCH_KEYS,
    BUILTIN,
    batch_key_problems,
    load_deepspeed_config,
    zero_stage,
)
from tests.trainer.trainer_helpers import TrainerProcess, write_config

JOB = """[job]
name = "ds"
output_dir = "out"
[train]
model = "org/model"
dataset = "d.jsonl"
per_device_train_batch_size = 2
gradient_accumulation_steps = 4
[launch]
nproc_per_node = 2
"""


def refused(text: str, folder: Path) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, folder / "job.toml")
    return str(caught.value)


def write_ds(folder: Path, **keys: Any) -> Path:
    path = folder / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **keys}))
    return path


def test_builtin_configs_leave_the_batch_to_train() -> None:
    assert sorted(BUILTIN) == ["zero2", "zero3", "zero3-offload"]
    for name in BUILTIN:
        config = load_deepspeed_config(name)
        assert all(config[key] == "auto" for key in BATCH_KEYS)
        assert "optimizer" not in config  # HF's AdamW from [train]; no compiled op
        config["zero_optimization"]["stage"] = 0  # a copy: the table is not changed
    assert [zero_stage(BUILTIN[n]) for n in ("zero2", "zero3", "zero3-offload")] == [2, 3, 3]


def test_a_builtin_name_stays_a_name_and_a_path_is_resolved(tmp_path: Path) -> None:
    spec = parse_spec(JOB + 'deepspeed = "zero3"\n', tmp_path / "job.toml")
    assert spec.launch.deepspeed == "zero3"
    write_ds(tmp_path)
    spec = parse_spec(JOB + 'deepspeed = "ds.json"\n', tmp_path / "job.toml")
    assert spec.launch.deepspeed == str(tmp_path / "ds.json")


def test_a_path_whose_batch_keys_disagree_is_refused_at_check_time(tmp_path: Path) -> None:
    write_ds(tmp_path, train_micro_batch_size_per_gpu=4, train_batch_size=16)
    message = refused(JOB + 'deepspeed = "ds.json"\n', tmp_path)
    assert "job.toml:11: [launch] deepspeed: " in message
    assert "train_micro_batch_size_per_gpu = 4 disagrees with [train] " in message
    assert "per_device_train_batch_size = 2" in message
    # 2 per device x 4 accumulation x 2 processes = 16: that key agrees.
    assert "train_batch_size = 16" not in message
    write_ds(tmp_path, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=4)
    assert parse_spec(JOB + 'deepspeed = "ds.json"\n', tmp_path / "job.toml").launch.deepspeed


def test_missing_or_broken_config_files_are_refused(tmp_path: Path) -> None:
    assert "no such file" in refused(JOB + 'deepspeed = "nope.json"\n', tmp_path)
    (tmp_path / "bad.json").write_text("{")
    assert "not readable JSON" in refused(JOB + 'deepspeed = "bad.json"\n', tmp_path)


def test_an_elastic_job_must_leave_accumulation_to_ftsup() -> None:
    problems = batch_key_problems(
        {"gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 2},
        per_device=2,
        accumulation=None,
        world_size=None,
    )
    assert problems == [
        "[launch] deepspeed: gradient_accumulation_steps = 4: ftsup sets it when the job "
        'starts; write "auto"'
    ]


def test_deepspeed_runs_go_through_the_torchrun_wrapper_even_on_one_process(
    tmp_path: Path,
) -> None:
    argv = build_trainer_argv(
        tmp_path / "train.json", None, LaunchSection(deepspeed="zero2"), sys.executable
    )
    assert argv[1:3] == ["-m", DISTRUN_MODULE]
    assert argv[-2:] == ["--deepspeed", "zero2"]


def test_the_trainer_refuses_a_disagreeing_config_with_exit_2(
    tmp_path: Path, tiny_model: Path, arith_data: Path
) -> None:
    """One process: the check comes before DeepSpeed starts; nothing is trained."""
    ds = write_ds(tmp_path, gradient_accumulation_steps=8)
    train = {"model": str(tiny_model), "dataset": [str(arith_data)], "max_steps": 2}
    config = write_config(tmp_path / "run", train)
    process = TrainerProcess(config, launch=LaunchSection(deepspeed=str(ds)))
    try:
        assert process.wait(timeout=120) == 2, process.log()
    finally:
        process.kill_group()
    assert "gradient_accumulation_steps = 8 disagrees with [train]" in process.log()
    assert not (tmp_path / "run" / "out" / "checkpoint-1").exists()


def test_another_zero_stage_at_resume_is_refused(tmp_path: Path) -> None:
    """ZeRO-2 optimizer shards do not load under ZeRO-3, and without DeepSpeed the
    optimizer state would silently be dropped: the stage is in the fingerprint."""
    from ftsup.supervisor.checkpoints.drift_guard import diff_fingerprints, drift_refused
    from ftsup.supervisor.fingerprint import train_fingerprint

    specs = {
        name: parse_spec(JOB + f'deepspeed = "{name}"\n', tmp_path / "job.toml")
        for name in ("zero2", "zero3")
    }
    assert {n: s.launch.zero_stage for n, s in specs.items()} == {"zero2": 2, "zero3": 3}
    plain = parse_spec(JOB, tmp_path / "job.toml")
    assert plain.launch.zero_stage == 0

    def fingerprint(spec: Any) -> dict[str, Any]:
        assert spec.train is not None
        return train_fingerprint(spec.train, 2, zero_stage=spec.launch.zero_stage)

    drifts = diff_fingerprints(fingerprint(specs["zero2"]), fingerprint(specs["zero3"]))
    assert [d.message for d in drifts] == [
        "DeepSpeed ZeRO stage changed from 2 to 3: changes the optimizer state"
    ]
    assert drift_refused(drifts)
    assert drift_refused(diff_fingerprints(fingerprint(specs["zero2"]), fingerprint(plain)))
    # A checkpoint from before the stage was recorded is not compared on it.
    old = {k: v for k, v in fingerprint(specs["zero2"]).items() if k != "zero_stage"}
    assert not diff_fingerprints(old, fingerprint(specs["zero2"]))
