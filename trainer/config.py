"""`train.json` -> `RunConfig`: the shared `[train]` rules, then what only the trainer can check.

The values of a `[train]` table are validated by `supervisor/spec.py`
(`parse_train_table`), the same fields, bounds and messages as `ftsup check`,
so a table the supervisor accepts is one the trainer accepts. This module adds
only the checks that need the trainer's machine: do the data files exist and
parse, is bf16 or qlora possible here, does a local model folder exist. Every
problem becomes a `ConfigError` whose message names the key or file and the
fix; the entry point prints it and exits 2, which the supervisor never retries.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.spec import (
    FINETUNING_TYPES,
    LR_SCHEDULERS,
    SpecError,
    SpecIssue,
    parse_train_table,
)
from ftsup.supervisor.spec_types import TrainSection
from ftsup.trainer.data import DataError, load_conversations

__all__ = [
    "FINETUNING_TYPES",
    "LR_SCHEDULERS",
    "ConfigError",
    "MemoryConfig",
    "RunConfig",
    "at_world_size",
    "check_data",
    "check_environment",
    "load_run_config",
    "train_section_from_dict",
]

# Keys whose default is "unset": the daemon writes them as null in train.json.
_UNSET_KEYS = frozenset(f.name for f in dataclasses.fields(TrainSection) if f.default is None)


class ConfigError(ValueError):
    """One or more problems with the configuration; `problems` lists them all."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class MemoryConfig:
    """train.json `memory`: keep the newest training state in `dir` every `every` steps."""

    dir: Path
    every: int
    # Optional `max_overhead` (0..1): the most of training time snapshots may take
    # (absent: memory_tier.DEFAULT_MAX_OVERHEAD, 0: every due step).
    max_overhead: float | None = None


@dataclass(frozen=True)
class RunConfig:
    """Everything the trainer process needs, as written by the daemon."""

    train: TrainSection
    output_dir: Path
    async_save: bool = True
    job_name: str = "ftsup"
    source: Path | None = None
    # Elastic jobs: the global batch kept at any world size (train.json `elastic`).
    elastic_global_batch: int | None = None
    # [launch] deepspeed (the trainer's --deepspeed): a built-in name or a JSON file.
    deepspeed: str | None = None
    # [launch] fsdp (the trainer's --fsdp): full_shard or shard_grad_op.
    fsdp: str | None = None
    # The memory tier (train.json `memory`, issue 18); None: off.
    memory: MemoryConfig | None = None


def load_run_config(path: Path, *, check_files: bool = True) -> RunConfig:
    """Read and check a train.json (values, hardware and, with `check_files`, the data)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"--config {path}: file not found"]) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError([f"--config {path}: not readable JSON ({exc})"]) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict):
        raise ConfigError([f"--config {path}: expected an object with a `train` table"])
    if not isinstance(raw.get("output_dir"), str):
        raise ConfigError([f"--config {path}: `output_dir` (an absolute path) is missing"])
    train = train_section_from_dict(raw["train"], base_dir=path.parent)
    config = RunConfig(
        train=train,
        output_dir=Path(raw["output_dir"]),
        async_save=bool(raw.get("async_save", True)),
        job_name=str(raw.get("job_name", "ftsup")),
        source=path,
        elastic_global_batch=_elastic_global_batch(raw.get("elastic"), path),
        memory=_memory(raw.get("memory"), path),
    )
    problems: list[str] = []
    checks = [check_environment] + ([check_data] if check_files else [])
    for check in checks:
        try:
            check(train)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return config


def _elastic_global_batch(value: Any, path: Path) -> int | None:
    """`"elastic": {"global_batch": G}` -> G; absent or null -> not elastic."""
    if value is None:
        return None
    batch = value.get("global_batch") if isinstance(value, dict) else None
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(
            [f'--config {path}: `elastic` must be {{"global_batch": N}} with N >= 1, got {value!r}']
        )
    return batch


def _memory(value: Any, path: Path) -> MemoryConfig | None:
    """`"memory": {"dir": DIR, "every": N}` (N >= 1) -> MemoryConfig; absent or null -> off."""
    if value is None:
        return None
    folder = value.get("dir") if isinstance(value, dict) else None
    every = value.get("every") if isinstance(value, dict) else None
    if (
        not isinstance(folder, str)
        or not folder
        or isinstance(every, bool)
        or not isinstance(every, int)
        or every < 1
    ):
        raise ConfigError(
            [
                f'--config {path}: `memory` must be {{"dir": FOLDER, "every": N}} with N >= 1, '
                f"got {value!r}"
            ]
        )
    overhead = value.get("max_overhead")
    if overhead is not None and (
        isinstance(overhead, bool) or not isinstance(overhead, int | float) or not 0 <= overhead < 1
    ):
        raise ConfigError(
            [f"--config {path}: `memory.max_overhead` must be a number in [0, 1), got {overhead!r}"]
        )
    return MemoryConfig(
        dir=Path(folder),
        every=every,
        max_overhead=None if overhead is None else float(overhead),
    )


def at_world_size(config: RunConfig, world_size: int) -> RunConfig:
    """The configuration as it runs on `world_size` processes.

    An elastic run's accumulation becomes global batch / (per-device batch x
    world size), so each optimizer step sees the same samples at any world size;
    a ConfigError when that is not a whole number. Not elastic: unchanged.
    """
    from ftsup.supervisor.fingerprint import elastic_accumulation

    batch = config.elastic_global_batch
    if batch is None:
        return config
    per_device = config.train.per_device_train_batch_size
    try:
        accumulation = elastic_accumulation(batch, per_device, world_size)
    except ValueError:
        raise ConfigError(
            [
                f"elastic global batch {batch} cannot be kept on {world_size} process(es): "
                f"it is not a multiple of [train] per_device_train_batch_size ({per_device}) "
                f"x {world_size}; run on a number of processes that divides the job's full count"
            ]
        ) from None
    train = dataclasses.replace(config.train, gradient_accumulation_steps=accumulation)
    return dataclasses.replace(config, train=train)


def train_section_from_dict(
    table: Mapping[str, Any], *, base_dir: Path | None = None
) -> TrainSection:
    """Build a TrainSection by the supervisor's `[train]` rules; every problem is reported.

    Relative dataset paths start from `base_dir` (train.json's folder), else the
    working folder. A null is accepted only for keys whose default is unset.
    """
    values = {k: v for k, v in table.items() if not (v is None and k in _UNSET_KEYS)}
    source = (base_dir if base_dir is not None else Path.cwd()) / "train.json"
    try:
        return parse_train_table(values, source)
    except SpecError as exc:
        raise ConfigError([_problem(issue) for issue in exc.issues]) from None


def _problem(issue: SpecIssue) -> str:
    """`[train] lora_rank: must be at least 1, got 0` (train.json has no line numbers)."""
    key = issue.key.replace("train.", "[train] ", 1) if issue.key else "[train]"
    text = f"{key}: {issue.message}"
    return f"{text}; {issue.hint}" if issue.hint else text


def check_environment(train: TrainSection) -> None:
    """Hardware and library checks: bf16/fp16 need a GPU, qlora needs CUDA + bitsandbytes."""
    import torch

    problems = []
    cuda = torch.cuda.is_available()
    if train.bf16 and not (cuda and torch.cuda.is_bf16_supported()):
        where = "this GPU" if cuda else "this machine (no CUDA GPU)"
        problems.append(f"[train] bf16 = true: {where} has no bf16 support; set bf16 = false")
    if train.fp16 and not cuda:
        problems.append("[train] fp16 = true: needs a CUDA GPU; set fp16 = false on CPU")
    if train.finetuning_type == "qlora":
        if not cuda:
            problems.append(
                '[train] finetuning_type = "qlora": 4-bit loading needs a CUDA GPU; '
                'use "lora" on this machine'
            )
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                '[train] finetuning_type = "qlora": needs bitsandbytes; '
                "pip install bitsandbytes, or use lora"
            )
    for key in ("model", "tokenizer"):
        value = getattr(train, key)
        if value and _looks_local(value) and not Path(value).is_dir():
            problems.append(f"[train] {key} = {value!r}: no such folder")
    if problems:
        raise ConfigError(problems)


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def check_data(train: TrainSection) -> None:
    """Every file exists, parses and has usable rows."""
    try:
        load_conversations(train.dataset, train.format)
    except DataError as exc:
        raise ConfigError([str(exc)]) from None
