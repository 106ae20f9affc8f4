"""The configuration fingerprint of a built-in trainer run: what must not change
across a resume for it to be exact.

One definition for both sides: the trainer writes it into each checkpoint's
manifest, the daemon computes it from the job at resume and compares the two
(`checkpoints.drift_guard`). Pure and stdlib-only, so the daemon never needs torch.

An elastic job (`[gpu] elastic`) keeps its global batch G = per-device batch x
accumulation x world size when it runs on fewer processes: the accumulation is
recomputed as G / (per-device batch x world size) (`elastic_accumulation`), and
the fingerprint carries `global_batch`, which lets the drift guard accept the
change of world size and accumulation as an elastic resize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftsup.supervisor.spec_types import TrainSection


def elastic_accumulation(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """Accumulation steps that keep `global_batch` at `world_size`; ValueError if none does."""
    per_step = per_device_batch * world_size
    if global_batch < 1 or per_step < 1 or global_batch % per_step:
        raise ValueError(
            f"elastic global batch {global_batch} is not a whole number of "
            f"per-device batches ({per_device_batch}) x processes ({world_size})"
        )
    return global_batch // per_step


def train_fingerprint(
    train: TrainSection,
    world_size: int,
    *,
    global_batch: int | None = None,
    zero_stage: int = 0,
    fsdp: bool = False,
) -> dict[str, Any]:
    """`global_batch` (elastic jobs): the accumulation recorded is the one that keeps it
    at `world_size`, whatever `train` says (ValueError when none does). `zero_stage`:
    DeepSpeed's (0 without DeepSpeed): another stage cannot load the optimizer state.
    `fsdp`: sharded (DCP) checkpoints, which a run without FSDP cannot load (nor back)."""
    accumulation = train.gradient_accumulation_steps
    if global_batch is not None:
        accumulation = elastic_accumulation(
            global_batch, train.per_device_train_batch_size, world_size
        )
    datasets = []
    for name in train.dataset:
        path = Path(name)
        datasets.append({"path": str(path), "size": path.stat().st_size if path.exists() else None})
    fingerprint: dict[str, Any] = {
        "model": train.model,
        "dataset": datasets,
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": accumulation,
        "world_size": world_size,
        "cutoff_len": train.cutoff_len,
        "seed": train.seed,
        "finetuning_type": train.finetuning_type,
        "zero_stage": zero_stage,
        "fsdp": fsdp,
    }
    if global_batch is not None:
        fingerprint["global_batch"] = global_batch
    return fingerprint
