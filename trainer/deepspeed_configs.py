"""`[launch] deepspeed`: the built-in ZeRO configurations and the checks on a given one.

Stdlib only: `ftsup check` (supervisor/spec.py) runs the same checks as the
trainer, before anything starts. A built-in name gives a configuration whose
batch keys are "auto", so transformers fills them from `[train]`; a PATH is
used as given, but its batch keys must be "auto" or agree with `[train]`,
since ftsup's fingerprint, elastic accounting and data skipping on resume
all assume the `[train]` batch geometry.

No "optimizer" or "scheduler" section: HF Trainer then builds its own AdamW
and schedule from `[train]` (DeepSpeed's FusedAdam would need a compiled op).
ZeRO-3 with offload keeps that AdamW on the CPU copies
(`zero_force_ds_cpu_optimizer: false`); give a PATH with an "optimizer"
section for DeepSpeedCPUAdam where its op is built.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
AUTO = "auto"

_COMMON: dict[str, Any] = {
    "train_batch_size": AUTO,
    "train_micro_batch_size_per_gpu": AUTO,
    "gradient_accumulation_steps": AUTO,
    "gradient_clipping": AUTO,
    "zero_allow_untested_optimizer": True,
    "fp16": {
        "enabled": AUTO,
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": AUTO},
}

_ZERO2: dict[str, Any] = {
    "stage": 2,
    "allgather_partitions": True,
    "allgather_bucket_size": 500_000_000,
    "overlap_comm": False,
    "reduce_scatter": True,
    "reduce_bucket_size": AUTO,  # hidden_size² (transformers); 5e8 allocates 2 GB per rank
    "contiguous_gradients": True,
    # Off: it only speeds up gradient copies under CPU offload (none here), and
    # DeepSpeed 0.19's universal checkpoint of a round-robin run puts values under
    # the wrong parameters, so such a run could not resume on another world size.
    "round_robin_gradients": False,
}

_ZERO3: dict[str, Any] = {
    "stage": 3,
    "overlap_comm": False,
    "contiguous_gradients": True,
    "sub_group_size": 1_000_000_000,
    "reduce_bucket_size": AUTO,
    "stage3_prefetch_bucket_size": AUTO,
    "stage3_param_persistence_threshold": AUTO,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    # The checkpoint's model.safetensors is then the whole model (export, eval).
    "stage3_gather_16bit_weights_on_model_save": True,
}

_OFFLOAD = {"device": "cpu", "pin_memory": True}

BUILTIN: Mapping[str, Mapping[str, Any]] = {
    "zero2": {**_COMMON, "zero_optimization": _ZERO2},
    "zero3": {**_COMMON, "zero_optimization": _ZERO3},
    "zero3-offload": {
        **_COMMON,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": {
            **_ZERO3,
            "offload_optimizer": dict(_OFFLOAD),
            "offload_param": dict(_OFFLOAD),
        },
    },
}


class DeepSpeedConfigError(ValueError):
    """A `[launch] deepspeed` value that cannot be used; the message names the key or file."""


def is_builtin(value: str) -> bool:
    return value in BUILTIN


def load_deepspeed_config(value: str) -> dict[str, Any]:
    """A built-in name's configuration (a fresh copy), or the JSON object in file `value`."""
    if is_builtin(value):
        return copy.deepcopy(dict(BUILTIN[value]))
    path = Path(value)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeepSpeedConfigError(
            f"[launch] deepspeed = {value!r}: no such file; use one of "
            f"{', '.join(BUILTIN)} or a DeepSpeed JSON file"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeepSpeedConfigError(
            f"[launch] deepspeed = {value!r}: not readable JSON ({exc})"
        ) from None
    if not isinstance(raw, dict):
        raise DeepSpeedConfigError(f"[launch] deepspeed = {value!r}: expected a JSON object")
    stage = (
        raw.get("zero_optimization", {}).get("stage")
        if isinstance(raw.get("zero_optimization"), dict)
        else None
    )
    if stage is not None and stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(
            f"[launch] deepspeed = {value!r}: zero_optimization.stage must be 0-3, got {stage!r}"
        )
    return raw


def batch_key_problems(
    config: Mapping[str, Any],
    *,
    per_device: int,
    accumulation: int | None,
    world_size: int | None,
    source: str = "[launch] deepspeed",
) -> list[str]:
    """One message per batch key that is neither "auto" nor `[train]`'s value.

    `accumulation` or `world_size` None: not known yet (an elastic job's
    accumulation is set at launch), so a fixed value for that key is refused.
    """
    expected: dict[str, tuple[int | None, str]] = {
        "train_micro_batch_size_per_gpu": (per_device, "[train] per_device_train_batch_size"),
        "gradient_accumulation_steps": (accumulation, "[train] gradient_accumulation_steps"),
        "train_batch_size": (
            None
            if accumulation is None or world_size is None
            else per_device * accumulation * world_size,
            "[train] per_device_train_batch_size x gradient_accumulation_steps x processes",
        ),
    }
    problems = []
    for key in BATCH_KEYS:
        if key not in config or config[key] == AUTO:
            continue
        want, meaning = expected[key]
        got = config[key]
        if want is None:
            problems.append(
                f'{source}: {key} = {got!r}: ftsup sets it when the job starts; write "auto"'
            )
        elif isinstance(got, bool) or got != want:
            problems.append(
                f'{source}: {key} = {got!r} disagrees with {meaning} = {want}; write "auto" '
                "or the same value"
            )
    return problems


def zero_stage(config: Mapping[str, Any]) -> int:
    zero = config.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    return int(stage)


__all__ = [
    "AUTO",
    "BATCH_KEYS",
    "BUILTIN",
    "DeepSpeedConfigError",
    "batch_key_problems",
    "is_builtin",
    "load_deepspeed_config",
    "zero_stage",
]
