"""Elastic world size (issue 15): the global batch the trainer keeps at any world size.

An elastic job's train.json carries `"elastic": {"global_batch": G}`; the trainer
sets its accumulation to G / (per-device batch x world size), and refuses a
world size that cannot keep G. The real run, 2 -> 1 -> 2 processes under a
daemon with every step's loss matched against an uninterrupted one-process run
(within float rounding: on two processes the gradient is the all-reduced mean
of two partial sums, on one a single sum), is tests/trainer/test_elastic_jobs.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.spec_types import TrainSection
from ftsup.supervisor.trainer_launch import train_json, write_train_json
from ftsup.trainer.config import ConfigError, at_world_size, load_run_config
from tests.trainer.trainer_helpers import TrainerProcess, write_config

MAX_STEPS = 9
PER_DEVICE = 2


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
