"""`[train]` has one set of rules: what docs/trainer.md promises, `ftsup check`
accepts, and the built-in trainer accepts exactly what `ftsup check` accepts.

Issue 13: spec.py refused `val_size = 50` (a row count the docs and
`data.split_eval` accept), the two sides disagreed on the least `cutoff_len`,
and each kept its own list of scheduler names, two of which crash the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.spec import (
    FINETUNING_TYPES,
    LR_SCHEDULERS,
    TRAIN_FORMATS,
    SpecError,
    parse_spec,
)
from ftsup.supervisor.spec_types import TrainSection
from ftsup.trainer.config import ConfigError, load_run_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"
BASE: dict[str, Any] = {"model": "org/model", "dataset": "d.jsonl", "max_steps": 10}


def toml_value(value: Any) -> str:
    """JSON spells ints, floats, strings, booleans and arrays as TOML does."""
    return json.dumps(value)


def job_text(train: dict[str, Any]) -> str:
    lines = ["[job]", 'name = "v"', 'output_dir = "/tmp/ftsup-train-validation-out"', "[train]"]
    return "\n".join(lines + [f"{key} = {toml_value(v)}" for key, v in train.items()]) + "\n"


def ftsup_check(folder: Path, train: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """The real CLI on a job file holding this `[train]` table."""
    job = folder / "job.toml"
    job.write_text(job_text(train))
    argv = [sys.executable, "-m", "ftsup.supervisor", "check", str(job)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------ docs/trainer.md


def doc_key_rows() -> list[tuple[list[str], list[str], str]]:
    """(keys, defaults, meaning) per row of the `[train]` keys table."""
    text = DOC.read_text()
    section = text[text.index("## `[train]` keys") :]
    rows = []
    lines = section.split("\n")
    first = next(i for i, line in enumerate(lines) if line.startswith("| `"))
    for line in lines[first:]:
        if not line.startswith("| `"):
            break
        keys_cell, default_cell, meaning = (c.strip() for c in line.strip("|").split(" | ", 2))
        keys = re.findall(r"`([a-z0-9_]+)`", keys_cell)
        rows.append((keys, [d.strip() for d in default_cell.split(", ")], meaning))
    return rows


def toml_literal(text: str) -> tuple[bool, Any]:
    try:
        return True, tomllib.loads(f"v = {text.strip('`')}")["v"]
    except tomllib.TOMLDecodeError:
        return False, None


def documented_forms() -> list[tuple[str, Any]]:
    """Every default in the key table that is a TOML value, and every line of the
    "Forms `ftsup check` accepts" block."""
    forms = []
    for keys, defaults, _ in doc_key_rows():
        for key, default in zip(keys, defaults, strict=False):
            ok, value = toml_literal(default)
            if ok and len(keys) == len(defaults):
                forms.append((key, value))
    text = DOC.read_text()
    block = text[text.index("Forms `ftsup check` accepts") :]
    block = block[block.index("```toml") + len("```toml") : block.index("```\n", 8)]
    for line in block.strip().split("\n"):
        parsed = tomllib.loads(line)
        forms += list(parsed.items())
    return forms


def test_doc_table_lists_every_train_key() -> None:
    documented = {key for keys, _, _ in doc_key_rows() for key in keys}
    assert documented == {f.name for f in dataclasses.fields(TrainSection)}


def test_doc_names_the_documented_forms() -> None:
    forms = dict(documented_forms())
    assert {"val_size", "cutoff_len", "lr_scheduler_type"} <= forms.keys()
    assert any(key == "val_size" and value >= 1 for key, value in documented_forms())


@pytest.mark.parametrize(
    ("key", "value"), documented_forms(), ids=lambda v: str(v) if isinstance(v, str) else None
)
def test_ftsup_check_accepts_each_documented_form(key: str, value: Any, tmp_path: Path) -> None:
    result = ftsup_check(tmp_path, {**BASE, key: value})
    assert result.returncode == 0, f"{key} = {value!r}: {result.stdout}{result.stderr}"


def documented_minimums() -> list[tuple[str, int]]:
    """Rows whose meaning says "at least N" for a single key."""
    found = []
    for keys, _, meaning in doc_key_rows():
        if len(keys) == 1 and (match := re.search(r"at least (\d+)", meaning)):
            found.append((keys[0], int(match.group(1))))
    return found


def test_documented_minimums_are_the_enforced_ones(tmp_path: Path) -> None:
    minimums = documented_minimums()
    assert {"cutoff_len", "save_total_limit"} <= {key for key, _ in minimums}
    for key, least in minimums:
        assert ftsup_check(tmp_path, {**BASE, key: least}).returncode == 0, key
        refused = ftsup_check(tmp_path, {**BASE, key: least - 1})
        assert refused.returncode != 0 and key in refused.stdout + refused.stderr, key


def test_documented_schedulers_are_the_accepted_ones() -> None:
    meaning = next(m for keys, _, m in doc_key_rows() if "lr_scheduler_type" in keys)
    listed = re.findall(r"`([a-z_]+)`", meaning.split("schedulers:", 1)[1])
    assert [name for name in listed if name != "val_size"] == list(LR_SCHEDULERS)


# ------------------------------------------- trainer accepts what spec accepts

# Values refused only on a machine without the hardware (check_environment).
HARDWARE = [("bf16", True), ("fp16", True), ("finetuning_type", "qlora")]
PROBES: list[Any] = [
    -1,
    0,
    0.5,
    0.999,
    1,
    1.5,
    2,
    3,
    50,
    50.0,
    2**20,
    2**20 + 1,
    2**32,
    10**13,
    True,
    False,
    "",
    "x",
    "10m",
    "all",
    [],
    ["a.jsonl"],
    *LR_SCHEDULERS,
    *TRAIN_FORMATS,
    *FINETUNING_TYPES,
    "cosine_with_min_lr",
    "warmup_stable_decay",
]
COMBINATIONS: list[dict[str, Any]] = [
    {"eval_steps": 5},
    {"eval_steps": 5, "val_size": 0.1},
    {"eval_steps": 5, "val_size": 50},
    {"lr_scheduler_type": "reduce_lr_on_plateau"},
    {"lr_scheduler_type": "reduce_lr_on_plateau", "val_size": 3},
    {"max_steps": -1, "num_train_epochs": 0},
    {"bf16": True, "fp16": True},
    {"val_size": 1e9},
    {"val_size": 1e9 + 1},
]


def spec_verdict(folder: Path, train: dict[str, Any]) -> TrainSection | str:
    try:
        spec = parse_spec(job_text(train), folder / "job.toml")
    except SpecError as exc:
        return str(exc)
    assert spec.train is not None
    return spec.train


def trainer_verdict(folder: Path, train: dict[str, Any]) -> TrainSection | str:
    config = folder / "train.json"
    config.write_text(json.dumps({"train": train, "output_dir": str(folder / "out")}))
    try:
        return load_run_config(config, check_files=False).train
    except ConfigError as exc:
        return str(exc)


def test_trainer_accepts_exactly_what_ftsup_check_accepts(tmp_path: Path) -> None:
    cases = [
        {**BASE, key: probe}
        for key in (f.name for f in dataclasses.fields(TrainSection))
        for probe in PROBES
        if (key, probe) not in HARDWARE
    ]
    cases += [{**BASE, **combo} for combo in COMBINATIONS]
    disagreements = []
    for train in cases:
        spec, trainer = spec_verdict(tmp_path, train), trainer_verdict(tmp_path, train)
        if isinstance(spec, str) != isinstance(trainer, str) or (
            not isinstance(spec, str) and spec != trainer
        ):
            disagreements.append(f"{train}: ftsup check -> {spec!r}; trainer -> {trainer!r}")
    assert not disagreements, "\n".join(disagreements[:20])
    assert any(isinstance(spec_verdict(tmp_path, c), str) for c in cases)  # probes do refuse


def test_daemon_written_train_json_loads(tmp_path: Path) -> None:
    """What the daemon writes (every field, nulls for unset keys) is what spec parsed."""
    from ftsup.supervisor.trainer_launch import write_train_json

    spec = spec_verdict(tmp_path, {**BASE, "val_size": 50, "save_every": "10m"})
    assert isinstance(spec, TrainSection)
    config = write_train_json(tmp_path / "run" / "train.json", spec, output_dir=tmp_path / "o")
    assert load_run_config(config, check_files=False).train == spec


def test_every_scheduler_builds_as_the_trainer_passes_it() -> None:
    """The trainer passes lr_scheduler_type to transformers with no scheduler kwargs."""
    import torch
    from transformers import get_scheduler

    for name in LR_SCHEDULERS:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        get_scheduler(
            name,
            optimizer,
            num_warmup_steps=0,
            num_training_steps=10,
            scheduler_specific_kwargs={},
        )
