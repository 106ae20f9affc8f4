"""`[launch] fsdp`: HF Trainer's own FSDP2 integration, on CPU processes too (CI has no GPU).

The Trainer is given `fsdp=True` and an `fsdp_config` (FSDP2, sharded state
dicts: every rank writes its own shard of the weights and of the optimizer,
`pytorch_model_fsdp_0/` and `optimizer_0/` through torch.distributed.checkpoint).

Why CPU needs one step more: accelerate turns a configured FSDP plugin into
`DistributedType.FSDP` only when the process group is of a GPU-like kind
(accelerate/state.py, `AcceleratorState.__init__`: the FSDP branch sits under
`self.distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`, and
MULTI_CPU is not in that list). On a CPU-only host the plugin is silently
dropped and the model is wrapped in DDP: the run "works" but is not sharded
and saves full weights. torch's FSDP2 (`fully_shard`) itself runs on CPU with
gloo, so `with_fsdp_on_cpu` does, once the Trainer built its accelerator, what
accelerate does on a GPU: distributed type FSDP, the Trainer's own plugin.
On CUDA nothing is changed.
"""

from __future__ import annotations

import sys
from typing import Any

# `[launch] fsdp` values (HF's `fsdp` option names) -> FSDP2's reshard_after_forward:
# full_shard frees the gathered parameters after forward (ZeRO-3 like),
# shard_grad_op keeps them until backward (ZeRO-2 like).
STRATEGIES: dict[str, bool] = {"full_shard": True, "shard_grad_op": False}
STATE_DICT_TYPE = "SHARDED_STATE_DICT"


def training_kwargs(strategy: str) -> dict[str, Any]:
    """The TrainingArguments keywords for `[launch] fsdp = strategy`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"[launch] fsdp = {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    config = {
        "version": 2,
        "reshard_after_forward": STRATEGIES[strategy],
        "state_dict_type": STATE_DICT_TYPE,
    }
    return {"fsdp": True, "fsdp_config": config}


def with_fsdp_on_cpu(trainer_class: type) -> type:
    """`trainer_class` whose accelerator shards with FSDP on CPU too (module docstring)."""

    class FsdpTrainer(trainer_class):  # type: ignore[misc,valid-type]
        is_fsdp_enabled: bool  # set by Trainer.create_accelerator_and_postprocess

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            if not self.is_fsdp_enabled and self.args.fsdp_plugin_args is not None:
                self.is_fsdp_enabled = enable_fsdp_on_cpu(self.accelerator, self.args)

    return FsdpTrainer


def enable_fsdp_on_cpu(accelerator: Any, args: Any) -> bool:
    """Turn a multi-process CPU state into an FSDP one, as accelerate does for GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        if state.num_processes == 1:
            print(
                "ftsup trainer: warning: [launch] fsdp with one process: nothing to shard, "
                "the model is not wrapped",
                file=sys.stderr,
            )
        return False
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


__all__ = [
    "STATE_DICT_TYPE",
    "STRATEGIES",
    "enable_fsdp_on_cpu",
    "training_kwargs",
    "with_fsdp_on_cpu",
]
