"""Bad `[train]` input: exit code 2 and a message naming the key or file and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ftsup.trainer.config import ConfigError, load_run_config, train_section_from_dict
from tests.trainer.trainer_helpers import TRAINER_ENV, write_config


def table(model_dir: Path, data_file: Path, /, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": str(model_dir), "dataset": [str(data_file)], "max_steps": 2}
    return {**base, **overrides}


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "rank <= 0": ({"lora_rank": 0}, ["lora_rank", "at least 1"]),
    "save_total_limit = 1": ({"save_total_limit": 1}, ["save_total_limit", "at least 2"]),
    "bf16 on CPU": ({"bf16": True}, ["bf16", "set bf16 = false"]),
    "fp16 on CPU": ({"fp16": True}, ["fp16", "CUDA"]),
    "qlora without CUDA": ({"finetuning_type": "qlora"}, ["qlora", "CUDA", "lora"]),
    "unknown format": ({"format": "sharegpt2"}, ["format", "alpaca", "chat"]),
    "unknown finetuning_type": ({"finetuning_type": "dora"}, ["finetuning_type", "full"]),
    "unknown key": ({"save_step": 10}, ["save_step", 'did you mean "save_steps"']),
    "wrong type": ({"learning_rate": "1e-4"}, ["learning_rate", "expected a number"]),
    "eval_steps without split": ({"eval_steps": 5}, ["eval_steps", "val_size"]),
    "no steps": ({"max_steps": -1, "num_train_epochs": 0.0}, ["max_steps", "num_train_epochs"]),
    "cutoff_len = 1": ({"cutoff_len": 1}, ["cutoff_len", "at least 2"]),
    "val_size count not whole": ({"val_size": 2.5}, ["val_size", "whole number"]),
    "plateau without split": (
        {"lr_scheduler_type": "reduce_lr_on_plateau"},
        ["lr_scheduler_type", "val_size"],
    ),
    "missing model folder": ({"model": "/nonexistent/model"}, ["model", "no such folder"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_values_are_named(
    case: str, tiny_model: Path, arith_data: Path, tmp_path: Path
) -> None:
    overrides, needles = CASES[case]
    config = write_config(tmp_path, table(tiny_model, arith_data, **overrides))
    with pytest.raises(ConfigError) as info:
        load_run_config(config)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


DATA_CASES: dict[str, tuple[list[Any] | None, str, list[str]]] = {
    "missing file": (None, "missing.jsonl", ["missing.jsonl", "does not exist"]),
    "empty data set": ([], "empty.jsonl", ["empty", "empty.jsonl"]),
    "row missing output": (
        [{"instruction": "a", "output": "b"}, {"instruction": "c"}],
        "rows.jsonl",
        ["rows.jsonl: row 2", "'output'"],
    ),
    "unknown row shape": (
        [{"prompt": "a", "completion": "b"}],
        "odd.jsonl",
        ["odd.jsonl", "format"],
    ),
    "chat without assistant": (
        [{"messages": [{"role": "user", "content": "hi"}]}],
        "chat.jsonl",
        ["chat.jsonl: row 1", "assistant"],
    ),
    "bad role": (
        [{"messages": [{"role": "robot", "content": "hi"}]}],
        "roles.jsonl",
        ["roles.jsonl: row 1", "robot"],
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_named(case: str, tiny_model: Path, tmp_path: Path) -> None:
    rows, name, needles = DATA_CASES[case]
    data = tmp_path / name
    if rows is not None:
        write_rows(data, rows)
    config = write_config(tmp_path, table(tiny_model, data))
    with pytest.raises(ConfigError) as info:
        load_run_config(config)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_good_config_loads(tiny_model: Path, arith_data: Path, tmp_path: Path) -> None:
    config = load_run_config(
        write_config(tmp_path, table(tiny_model, arith_data, save_every="10m", val_size=50))
    )
    assert config.train.save_every == 600.0
    assert config.train.val_size == 50  # a row count, as docs/trainer.md says
    assert config.output_dir == tmp_path / "out"
    assert config.train.dataset == (str(arith_data),)


def test_unknown_keys_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        train_section_from_dict({"model": "m", "dataset": "d", "lora_rnak": 4, "sed": 1})
    assert len(info.value.problems) == 2


def run_main(config: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ftsup.trainer", "--config", str(config)]
    env = {**os.environ, **TRAINER_ENV}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("case", "needle"),
    [("bf16", "bf16 = true"), ("rows", "row 2"), ("rank", "lora_rank")],
)
def test_process_exits_2_with_message(
    case: str, needle: str, tiny_model: Path, arith_data: Path, tmp_path: Path
) -> None:
    if case == "bf16":
        train = table(tiny_model, arith_data, bf16=True)
    elif case == "rank":
        train = table(tiny_model, arith_data, lora_rank=-1)
    else:
        data = write_rows(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}, {}])
        train = table(tiny_model, data)
    result = run_main(write_config(tmp_path, train))
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
