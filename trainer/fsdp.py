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
from pathlib import Path
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
    """`trainer_class` whose accelerator shards with FSDP on CPU too (module docstring),
    and whose sharded checkpoints carry the model's config and tokenizer."""

    class FsdpTrainer(trainer_class):  # type: ignore[misc,valid-type]
        is_fsdp_enabled: bool  # set by Trainer.create_accelerator_and_postprocess

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            if not self.is_fsdp_enabled and self.args.fsdp_plugin_args is not None:
                self.is_fsdp_enabled = enable_fsdp_on_cpu(self.accelerator, self.args)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            super().save_model(output_dir, _internal_call=_internal_call)
            if output_dir is not None and self.args.should_save:
                save_model_description(self.model, self.processing_class, output_dir)

    return FsdpTrainer


def save_model_description(model: Any, tokenizer: Any, folder: str) -> None:
    """config.json (and the tokenizer) beside the DCP shards, written by rank 0.

    HF's sharded FSDP save writes only `pytorch_model_fsdp_0/`: without the
    config, `ftsup export` could not build the model the shards belong to, and
    the checkpoint would depend on the base model still being where it was.
    """
    target = Path(folder)
    if (target / "config.json").exists():
        return  # a full state dict save wrote the model as usual
    config = getattr(model, "config", None)
    if config is not None:
        config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


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
    "save_model_description",
    "training_kwargs",
    "with_fsdp_on_cpu",
]
