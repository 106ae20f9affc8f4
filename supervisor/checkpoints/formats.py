"""Which writer made a checkpoint folder, judged from the files it left.

A manifest wins (its writer promised to write it last); then DeepSpeed's
`latest`/`global_step*`; then any file an HF Trainer writes.
"""

from __future__ import annotations

from pathlib import Path

from .deepspeed import is_deepspeed
from .ftsup_format import has_manifest, manifest_temporaries
from .hf import (
    INCOMPLETE_MARKER,
    INDEX_FILES,
    OPTIMIZER,
    RNG_SINGLE,
    SCHEDULER,
    TRAINER_STATE,
    WEIGHT_FILES,
)
from .report import Format

_HF_NAMES = frozenset(
    (TRAINER_STATE, INCOMPLETE_MARKER, OPTIMIZER, SCHEDULER, RNG_SINGLE, "config.json")
) | frozenset(WEIGHT_FILES + INDEX_FILES)


def detect_format(folder: Path, *, require_manifest: bool = False) -> Format:
    if require_manifest or has_manifest(folder) or manifest_temporaries(folder):
        return "ftsup"
    if is_deepspeed(folder):
        return "deepspeed"
    if looks_hf(folder):
        return "hf"
    return "unknown"


def looks_hf(folder: Path) -> bool:
    return any(p.name in _HF_NAMES or p.name.startswith("rng_state") for p in folder.iterdir())
