"""`train.json` -> `RunConfig`, with every check that needs the files or the hardware.

The supervisor validates the shape of a `[train]` table before it starts
anything; this module repeats the cheap checks (a hand-written train.json gets
the same messages) and adds those only the trainer's machine can answer: do
the data files exist and parse, is bf16 available here. Every problem becomes
a `ConfigError` whose message names the key or file and the fix; the entry
point prints it and exits 2, which the supervisor never retries.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.durations import parse_duration
from ftsup.supervisor.spec_types import TrainSection
from ftsup.trainer.data import FORMATS, DataError, load_conversations

FINETUNING_TYPES = ("lora", "qlora", "full")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
_TUPLE_FIELDS = ("dataset", "lora_target", "report_to")


class ConfigError(ValueError):
    """One or more problems with the configuration; `problems` lists them all."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class RunConfig:
    """Everything the trainer process needs, as written by the daemon."""

    train: TrainSection
    output_dir: Path
    async_save: bool = True
    job_name: str = "ftsup"
    source: Path | None = None


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
    )
    problems: list[str] = []
    checks = [check_train_section, check_environment] + ([check_data] if check_files else [])
    for check in checks:
        try:
            check(train)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return config


def train_section_from_dict(table: dict[str, Any], *, base_dir: Path | None = None) -> TrainSection:
    """Build a TrainSection; unknown keys are errors with a suggestion."""
    names = [f.name for f in dataclasses.fields(TrainSection)]
    problems = []
    for key in table:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            problems.append(f"[train] {key}: unknown key{hint}")
    for key in ("model", "dataset"):
        if key not in table:
            problems.append(f"[train] {key}: required")
    if problems:
        raise ConfigError(problems)
    values = dict(table)
    for key in _TUPLE_FIELDS:
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    if isinstance(values.get("save_every"), str):  # a hand-written "10m"
        try:
            values["save_every"] = parse_duration(values["save_every"])
        except ValueError as exc:
            raise ConfigError([f"[train] save_every: {exc}"]) from None
    _check_types(values)
    for key in _TUPLE_FIELDS:
        if key in values:
            values[key] = tuple(values[key])
    if base_dir is not None:
        values["dataset"] = tuple(str((base_dir / p).resolve()) for p in values["dataset"])
    return TrainSection(**values)


def _check_types(values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(TrainSection)
    problems = []
    for key, value in values.items():
        if not _matches(value, hints[key]):
            problems.append(f"[train] {key} = {value!r}: expected {_describe(hints[key])}")
    if problems:
        raise ConfigError(problems)


def _matches(value: object, hint: object) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: object) -> str:
    text = str(hint).replace("<class '", "").replace("'>", "")
    return text.replace("tuple[str, ...]", "a list of strings").replace("NoneType", "unset")


def check_train_section(train: TrainSection) -> None:
    """Value checks that need nothing but the table itself."""
    problems: list[str] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"[train] {key} = {getattr(train, key)!r}: {message}")

    need(train.format in FORMATS, "format", f"use one of {', '.join(FORMATS)}")
    need(
        train.finetuning_type in FINETUNING_TYPES,
        "finetuning_type",
        f"use one of {', '.join(FINETUNING_TYPES)}",
    )
    need(train.cutoff_len >= 2, "cutoff_len", "must be at least 2 tokens")
    need(train.lora_rank > 0, "lora_rank", "must be a positive integer (8, 16, 64 ...)")
    need(train.lora_alpha is None or train.lora_alpha > 0, "lora_alpha", "must be positive")
    need(0.0 <= train.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
    need(len(train.lora_target) > 0, "lora_target", 'name modules, or use ["all"]')
    need(train.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
    need(train.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
    need(train.learning_rate > 0, "learning_rate", "must be positive")
    need(train.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type", f"use one of {SCHEDULERS}")
    need(train.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(0.0 <= train.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
    need(train.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(train.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
    need(
        train.max_steps > 0 or train.num_train_epochs > 0,
        "num_train_epochs",
        "set max_steps > 0 or num_train_epochs > 0",
    )
    need(train.seed >= 0, "seed", "must be >= 0")
    need(train.save_steps is None or train.save_steps > 0, "save_steps", "must be positive")
    need(train.save_every is None or train.save_every > 0, "save_every", "must be positive")
    need(
        train.save_total_limit >= 2,
        "save_total_limit",
        "must be at least 2, so the newest complete checkpoint survives while the next is written",
    )
    need(train.logging_steps >= 1, "logging_steps", "must be >= 1")
    need(train.val_size >= 0, "val_size", "must be >= 0 (a fraction < 1 or a row count)")
    need(train.eval_steps is None or train.eval_steps > 0, "eval_steps", "must be positive")
    need(
        train.eval_steps is None or train.val_size > 0,
        "eval_steps",
        "needs an eval split: set val_size",
    )
    need(train.dataloader_num_workers >= 0, "dataloader_num_workers", "must be >= 0")
    need(not (train.bf16 and train.fp16), "fp16", "bf16 and fp16 are exclusive: pick one")
    if problems:
        raise ConfigError(problems)


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
