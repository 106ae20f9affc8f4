"""Running HF Trainer's DeepSpeed integration on CPU processes too (CI has no GPU).

Why the Trainer path fails on CPU without this: `TrainingArguments` with
`deepspeed=` and `use_cpu=False` builds accelerate's `PartialState` with
`ACCELERATE_USE_DEEPSPEED=true` but no backend (transformers passes
`ddp_backend` only on its non-DeepSpeed branch). accelerate's
`_prepare_backend` finds no GPU, so the backend stays None, and a None
backend means "not distributed": `num_processes = 1` although DeepSpeed's
engine sees two ranks, hence "train_batch_size 2 != 2 * 1 * 2". With
`use_cpu=True` the CPU branch wins and DeepSpeed is never selected.

The fix uses accelerate's own route for a pre-configured state: build the
`PartialState` before `TrainingArguments` with `backend="gloo"` and the
DeepSpeed flag (accelerate then calls `deepspeed.init_distributed("gloo")`
and counts the real processes), and tell transformers to use it
(`accelerator_config={"use_configured_state": True}`). On CUDA nothing of
this is needed and nothing is changed.

DeepSpeed's CPU accelerator also JIT-compiles a shared-memory all-reduce
kernel (`deepspeed_shm_comm`, about 80 s of C++ on 2 cores) when its comm
backend starts. Only inference's tensor-parallel `inference_all_reduce` uses
it, never training, so on CPU the build is switched off: ftsup never
compiles DeepSpeed ops.
"""

from __future__ import annotations

import os
import sys
from typing import Any

SHM_COMM_OP = "deepspeed_shm_comm"


def cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def prepare_process() -> None:
    """Before deepspeed is imported: pick DeepSpeed's CPU accelerator on a CPU-only host."""
    if cpu_only():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def skip_op_builds() -> None:
    """No JIT build of the shm all-reduce kernel (see the module docstring)."""
    import deepspeed.ops as ops  # type: ignore[import-untyped,import-not-found]
    from deepspeed.accelerator import (  # type: ignore[import-untyped,import-not-found]
        get_accelerator,
    )

    if get_accelerator().device_name() != "cpu":
        return
    compatible: dict[str, bool] = dict(vars(ops).get("__compatible_ops__") or {})
    compatible[SHM_COMM_OP] = False
    # deepspeed.ops computes this lazily (a module __getattr__); setting it first
    # also skips the probe's compiler subprocesses. comm/torch.py is its only reader.
    ops.__compatible_ops__ = compatible  # type: ignore[attr-defined]


def configure_state(timeout_s: float) -> dict[str, Any]:
    """Set up accelerate for DeepSpeed; the extra TrainingArguments keywords it needs."""
    if not cpu_only():
        return {}
    from datetime import timedelta

    from accelerate.state import PartialState

    skip_op_builds()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(backend="gloo", timeout=timedelta(seconds=timeout_s))
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != world:  # an accelerate change broke the route: say so
        print(
            f"ftsup trainer: warning: accelerate sees {state.num_processes} process(es), "
            f"WORLD_SIZE is {world}",
            file=sys.stderr,
        )
    return {"use_cpu": False, "accelerator_config": {"use_configured_state": True}}


__all__ = ["configure_state", "cpu_only", "prepare_process", "skip_op_builds"]
