"""The configuration fingerprint of a built-in trainer run: what must not change
across a resume for it to be exact.

One definition for both sides: the trainer writes it into each checkpoint's
manifest, the daemon computes it from the job at resume and compares the two
(`checkpoints.drift_guard`). Pure and stdlib-only, so the daemon never needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftsup.supervisor.spec_types import TrainSection


def train_fingerprint(train: TrainSection, world_size: int) -> dict[str, Any]:
    datasets = []
    for name in train.dataset:
        path = Path(name)
        datasets.append({"path": str(path), "size": path.stat().st_size if path.exists() else None})
    return {
        "model": train.model,
        "dataset": datasets,
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "world_size": world_size,
        "cutoff_len": train.cutoff_len,
        "seed": train.seed,
        "finetuning_type": train.finetuning_type,
    }
