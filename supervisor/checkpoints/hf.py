"""Completeness rules for Hugging Face Trainer checkpoints (any HF-based tool).

The Trainer writes, in order: weights (plus config and tokenizer), optimizer,
scheduler, scaler, one RNG state per process, and `trainer_state.json` last
from rank 0. Rank 0 can finish `trainer_state.json` while another rank is
still writing its RNG file, so every rank's file is checked, not just the
marker. A save with `save_only_model` writes no optimizer, scheduler or RNG
state: valid weights, but nothing to resume from; any other gap is an
interrupted save.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from ..userfiles import NotRegularFile, read_bytes
from .files import check_file
from .findings import Findings

TRAINER_STATE = "trainer_state.json"
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG_SINGLE = "rng_state.pth"
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_RNG_RANK = re.compile(r"^rng_state_(\d+)\.pth$")
# optimizer.pt / .bin, FSDP's optimizer_0/ (torch.distributed.checkpoint) and
# optimizer.pt_* shards, SageMaker/XLA's rank<i>-of-<n>-optimizer.pt
_OPTIMIZER = re.compile(
    r"^(optimizer\.(pt|bin)|optimizer_\d+|optimizer\.pt_.+|rank\d+-of-\d+-optimizer\.pt)$"
)
_FSDP_WEIGHTS = re.compile(r"^pytorch_model_fsdp_\d+$")
_DCP_DIR = re.compile(r"^(pytorch_model_fsdp|optimizer)_\d+$")
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint writes it last


def check_hf(
    folder: Path,
    found: Findings,
    *,
    step: int | None,
    world_size: int | None,
    deep: bool = False,
    training_state_elsewhere: bool = False,
    weights_elsewhere: bool = False,
    skip_files: frozenset[str] = frozenset(),
    ranks: Collection[int] | None = None,
) -> None:
    """Fill `found` with what is wrong with an HF Trainer checkpoint in `folder`.

    `training_state_elsewhere`: optimizer and scheduler live in a DeepSpeed
    folder (checked there). `weights_elsewhere`: so may the weights (ZeRO-3).
    `ranks`: the ranks whose RNG files the folder must hold (a node-local copy,
    `save_on_each_node`); None: every rank of the world size.
    """
    names = {p.name for p in folder.iterdir()}
    if INCOMPLETE_MARKER in names:
        found.problem(f"{INCOMPLETE_MARKER} present (the trainer's save was interrupted)")
    _check_trainer_state(folder, found, step)
    _check_weights(folder, names, found, weights_elsewhere)
    _check_training_state(folder, names, found, world_size, training_state_elsewhere, ranks)
    _check_dcp_dirs(folder, names, found)
    skip = skip_files | {TRAINER_STATE}
    for path in sorted(folder.iterdir()):
        if path.name in skip or path.is_dir():  # a FIFO or device is checked: a finding
            continue
        if problem := check_file(path, deep=deep):
            found.problem(f"{path.name} {problem}")


def _check_trainer_state(folder: Path, found: Findings, step: int | None) -> None:
    path = folder / TRAINER_STATE
    try:
        raw = read_bytes(path, follow=True)
    except FileNotFoundError:
        found.problem(
            f"{TRAINER_STATE} missing (the trainer writes it last: the save did not finish)"
        )
        return
    except NotRegularFile as exc:
        found.problem(f"{TRAINER_STATE} is {exc.what}, not a regular file")
        return
    if not raw:
        found.problem(f"{TRAINER_STATE} is empty (0 bytes)")
        return
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        found.problem(f"{TRAINER_STATE} unparseable: {exc}")
        return
    global_step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(global_step, int) or isinstance(global_step, bool):
        found.problem(f"{TRAINER_STATE} has no global_step")
        return
    found.details["global_step"] = global_step
    if step is not None and global_step != step:
        found.problem(
            f"{TRAINER_STATE} says global_step {global_step}, the folder is checkpoint-{step}"
        )
    for key in ("max_steps", "epoch", "best_metric", "best_model_checkpoint"):
        if state.get(key) is not None:
            found.details[key] = state[key]
    found.details["metrics"] = _metrics_at(state.get("log_history"), global_step)


def _metrics_at(history: Any, step: int) -> dict[str, float]:
    """Numbers logged at this step (loss, eval_loss, ...): retention's keep_best reads them."""
    metrics: dict[str, float] = {}
    if not isinstance(history, list):
        return metrics
    for entry in history:
        if isinstance(entry, dict) and entry.get("step") == step:
            for key, value in entry.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    metrics[key] = float(value)
    return metrics


def _check_weights(folder: Path, names: set[str], found: Findings, elsewhere: bool) -> None:
    kinds = [name for name in WEIGHT_FILES if name in names]
    for index in INDEX_FILES:
        if index in names:
            kinds.append(index)
            _check_index(folder / index, names, found)
    kinds += sorted(n for n in names if _FSDP_WEIGHTS.match(n))
    found.details["weights"] = kinds
    if not kinds and not elsewhere:
        found.problem(
            "no model weights (model.safetensors, a sharded index, pytorch_model.bin "
            "or adapter_model.*)"
        )


def _check_index(path: Path, names: set[str], found: Findings) -> None:
    try:
        raw = read_bytes(path, follow=True)
    except FileNotFoundError:
        found.problem(f"{path.name} missing")
        return
    except NotRegularFile as exc:
        found.problem(f"{path.name} is {exc.what}, not a regular file")
        return
    try:
        index = json.loads(raw.decode("utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except (
        UnicodeDecodeError,
        json.JSONDecodeError,
        RecursionError,
        KeyError,
        TypeError,
        AttributeError,
    ):
        found.problem(f"{path.name} unparseable (no weight_map)")
        return
    for shard in shards:
        if shard not in names:
            found.problem(f"{shard} missing (named by {path.name})")


def _check_training_state(
    folder: Path,
    names: set[str],
    found: Findings,
    world_size: int | None,
    elsewhere: bool,
    ranks: Collection[int] | None = None,
) -> None:
    optimizer = elsewhere or any(_OPTIMIZER.match(n) for n in names)
    scheduler = elsewhere or SCHEDULER in names
    rng = RNG_SINGLE in names or any(_RNG_RANK.match(n) for n in names)
    if not (optimizer or scheduler or rng):
        found.weights_only(
            f"weights only: no {OPTIMIZER}, {SCHEDULER} or rng_state (saved with save_only_model?)"
        )
        return
    if not optimizer:
        found.problem(f"{OPTIMIZER} missing")
    if not scheduler:
        found.problem(f"{SCHEDULER} missing")
    _check_rng(names, found, world_size, ranks)


def rng_world_size(folder: Path) -> int | None:
    """The process count HF's RNG files imply (`rng_state_<r>.pth`: highest rank + 1).

    Every rank writes its own before the checkpoint counts as saved, so a rank
    whose DeepSpeed shard is gone is still named by its RNG file: the sharded
    layout's check then knows how many ranks to expect without the job's word.
    """
    ranks = _rng_ranks(os.listdir(folder))
    return max(ranks) + 1 if ranks else None


def _rng_ranks(names: Iterable[str]) -> set[int]:
    """The ranks named by `rng_state_<rank>.pth` files."""
    return {int(m.group(1)) for name in names if (m := _RNG_RANK.match(name))}


def _check_rng(
    names: set[str], found: Findings, world_size: int | None, held: Collection[int] | None = None
) -> None:
    """One RNG file per process: `rng_state.pth` alone, or `rng_state_<rank>.pth`
    for every rank. Rank files imply at least two processes; `world_size`, when
    known, can only raise the expected count. `held` (a node-local copy): exactly
    these ranks' files must be here, whatever the world size."""
    ranks = _rng_ranks(names)
    if held and (ranks or max(held) > 0 or (world_size or 0) > 1):
        for rank in sorted(held):
            if rank not in ranks:
                found.problem(
                    f"rng_state_{rank}.pth missing (this copy holds ranks "
                    f"{', '.join(map(str, sorted(held)))})"
                )
        found.details["world_size"] = max(world_size or 0, max(held) + 1, 2)
        found.details["ranks"] = sorted(held)
        return
    if ranks:
        expected = max(max(ranks) + 1, 2, world_size or 0)
        for rank in range(expected):
            if rank not in ranks:
                found.problem(f"rng_state_{rank}.pth missing (world size {expected})")
    elif RNG_SINGLE in names:
        expected = 1
        if world_size and world_size > 1:
            found.note(f"written by one process ({RNG_SINGLE}); the job runs {world_size}")
    else:
        expected = world_size or 1
        if expected == 1:
            found.problem(f"{RNG_SINGLE} missing")
        else:
            found.problem(f"rng_state_0.pth to rng_state_{expected - 1}.pth missing")
    found.details["world_size"] = expected


def _check_dcp_dirs(folder: Path, names: set[str], found: Findings) -> None:
    for name in sorted(n for n in names if _DCP_DIR.match(n)):
        if (folder / name).is_dir() and not (folder / name / DCP_METADATA).is_file():
            found.problem(f"{name}/{DCP_METADATA} missing (distributed checkpoint incomplete)")
