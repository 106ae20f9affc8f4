"""`python -m ftsup.trainer --config RUN/train.json [--resume-from CKPT]`.

Exit codes: 0 finished; 2 bad configuration or data (the supervisor never
retries it); 75 stopped on request after saving a checkpoint. A crash exits
1 with a traceback, which the restart policy judges.

Without `--resume-from` the run starts from scratch: choosing (and validating)
the checkpoint is the supervisor's job, never the trainer's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import EXIT_CONFIG, EXIT_OK, EXIT_STOPPED, checkpoint_step
from ftsup.trainer import dist
from ftsup.trainer.config import ConfigError, RunConfig, at_world_size, load_run_config
from ftsup.trainer.data import DataError
from ftsup.trainer.nodes import agree_on_resume, multi_node, node_ranks
from ftsup.trainer.prepared import PreparedData
from ftsup.trainer.progress import ProgressWriter, train_start_fields
from ftsup.trainer.signals import install_handlers

_NEVER = 10**12  # save_steps when only time-based saves are wanted
# How long other nodes wait for rank 0's resume choice (it validates a few folders).
AGREE_TIMEOUT_S = 600.0
# Where a memory snapshot is turned back into a checkpoint folder for HF to load
# (in the job's memory folder, beside the slots; removed after training).
MATERIALIZED_NAME = "resume"
EXIT_MEMORY_SNAPSHOT = 1  # an ordinary failure: the daemon restarts, from disk this time


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ftsup.trainer", description="ftsup's built-in fine-tuning trainer."
    )
    parser.add_argument("--config", required=True, type=Path, help="train.json written by ftsup")
    parser.add_argument(
        "--resume-from", type=Path, default=None, help="checkpoint folder to resume from"
    )
    parser.add_argument(
        "--deepspeed",
        default=None,
        help="[launch] deepspeed: zero2, zero3, zero3-offload or a DeepSpeed JSON file",
    )
    parser.add_argument(
        "--fsdp",
        default=None,
        choices=("full_shard", "shard_grad_op"),
        help="[launch] fsdp: shard weights, gradients and optimizer state with FSDP2",
    )
    return parser.parse_args(argv)


def fail(message: str) -> int:
    """Configuration errors: one clear message per problem, exit 2."""
    if dist.rank() == 0:
        for line in message.splitlines():
            print(f"ftsup trainer: error: {line}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: Sequence[str] | None = None, *, prepared: PreparedData | None = None) -> int:
    """`prepared`: data a warm standby tokenized before it was activated."""
    args = parse_args(argv)
    install_handlers()  # before the slow imports: a stop request is never lost
    if dist.world_size() > 1:
        dist.die_with_parent()
    try:
        config = run_config(args)
    except ConfigError as exc:
        return fail(str(exc))
    # Every node of a multi-node run resumes rank 0's choice (trainer/nodes.py);
    # with node-local folders, the newest step every node holds, from its own folder.
    args.resume_from = agree_on_resume(
        args.resume_from,
        config.output_dir,
        AGREE_TIMEOUT_S,
        node_local=config.train.save_on_each_node,
    )
    if args.resume_from is not None and not args.resume_from.is_dir():
        return fail(f"--resume-from {args.resume_from}: not a checkpoint folder")
    if args.resume_from is not None:
        warn_if_fingerprint_changed(config, args.resume_from)
        if already_finished(args.resume_from, config):
            dist.end_rank(EXIT_OK)  # a rank of a multi-process run ends here
            return EXIT_OK
    resize = None
    if args.resume_from is not None and config.deepspeed:
        from ftsup.trainer import zero_resize

        try:  # ZeRO shards of another world size: converted below (trainer/zero_resize.py)
            resize = zero_resize.plan_for(config.deepspeed, args.resume_from, dist.world_size())
        except zero_resize.ResizeError as exc:
            return fail(str(exc))
    try:
        trainer, callback = build_trainer(config, args.resume_from, prepared)
    except (ConfigError, DataError) as exc:
        return fail(str(exc))
    resume = str(args.resume_from) if args.resume_from else None
    if resize is not None:
        resume = str(zero_resize.convert(resize))  # rank 0 converts, every rank waits
        trainer.add_callback(zero_resize.after_load(resize))
    from ftsup.trainer import memory_snapshot

    materialized = None
    if args.resume_from is not None and memory_snapshot.is_snapshot(args.resume_from):
        # A memory snapshot: HF loads the checkpoint folder it stands for.
        materialized = args.resume_from.parent.parent / MATERIALIZED_NAME
        shutil.rmtree(materialized, ignore_errors=True)  # an earlier attempt's
        folder = materialized / args.resume_from.name
        try:
            resume = str(memory_snapshot.materialize(args.resume_from, trainer, folder))
        except Exception as exc:  # a cache of a disk state: give it up, never loop on it
            memory_snapshot.unseal(args.resume_from)
            shutil.rmtree(materialized, ignore_errors=True)
            print(
                f"ftsup trainer: error: memory snapshot {args.resume_from} cannot be resumed "
                f"({type(exc).__name__}: {exc}); unsealed it, so the next attempt resumes "
                "the newest disk checkpoint",
                file=sys.stderr,
            )
            return EXIT_MEMORY_SNAPSHOT
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if materialized is not None:
            shutil.rmtree(materialized, ignore_errors=True)
    code = EXIT_STOPPED if callback.stopped else EXIT_OK
    if not callback.stopped:
        dist.barrier()  # no rank leaves while another may still be in a collective
    dist.end_rank(code)  # a rank of a multi-process run ends here
    return code


def already_finished(checkpoint: Path, config: RunConfig) -> bool:
    """A checkpoint at `max_steps` is the end of training. HF's Trainer resumed from
    it would still train one more step (it checks for the end only after a step):
    a run restarted after its last save (a crash in the final export, a torchrun
    restart when a node left as the run ended) would no longer end as it did.
    When it is, the attempt is reported as one that ends where it starts."""
    step, max_steps = checkpoint_step(checkpoint), config.train.max_steps
    if max_steps <= 0 or step is None or step < max_steps:
        return False
    if dist.local_rank() == 0:  # an attempt as any other, which ends where it starts
        progress = ProgressWriter.from_env()
        fields = train_start_fields(
            step=step,
            max_steps=max_steps,
            resumed=checkpoint,
            world_size=dist.world_size(),
            gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        )
        progress.emit("train_start", **fields)
        progress.emit("train_end", step=step, reason="finished")
        progress.close()
    print(
        f"ftsup trainer: {checkpoint} is at max_steps ({max_steps}): training is complete",
        flush=True,
    )
    return True


def run_config(args: argparse.Namespace) -> RunConfig:
    """train.json at this world size, with the launcher's flags (ConfigError if bad)."""
    config = at_world_size(load_run_config(args.config, check_files=False), dist.world_size())
    if args.deepspeed:
        config = dataclasses.replace(config, deepspeed=args.deepspeed)
    if args.fsdp:
        config = dataclasses.replace(config, fsdp=args.fsdp)
    return config


def warn_if_fingerprint_changed(config: RunConfig, checkpoint: Path) -> None:
    """Resuming under other settings works, but the run is no longer exact: say so."""
    from ftsup.supervisor.checkpoints.drift_guard import elastic_summary
    from ftsup.supervisor.manifest import ManifestError, read_manifest

    try:
        saved = dict(read_manifest(checkpoint).fingerprint)
    except ManifestError:
        return  # not written by ftsup; the supervisor judged it resumable
    now = run_fingerprint(config)
    resized = elastic_summary(saved, now)
    if resized is not None and dist.rank() == 0:
        print(f"ftsup trainer: elastic resume from {checkpoint}: {resized}", file=sys.stderr)
    elastic = {"world_size", "gradient_accumulation_steps"} if resized else set()
    changed = sorted(
        key
        for key in set(saved) | set(now)
        if saved.get(key) != now.get(key) and key not in elastic
    )
    if changed and dist.rank() == 0:
        print(
            f"ftsup trainer: warning: resuming {checkpoint} with changed {', '.join(changed)}; "
            "the data order or batches differ from the original run",
            file=sys.stderr,
        )


def configure_determinism(seed: int) -> None:
    """Same seed, same bits on CPU: seed every RNG and refuse nondeterministic kernels."""
    import torch
    from transformers import set_seed

    set_seed(seed)
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_trainer(
    config: RunConfig, resume_from: Path | None, prepared: PreparedData | None = None
) -> tuple[Any, Any]:
    """Data, model, TrainingArguments and the callbacks, assembled into a Trainer."""
    from transformers import Trainer

    from ftsup.trainer.async_save import with_async_save
    from ftsup.trainer.batching import PadCollator
    from ftsup.trainer.callback import FtsupCallback
    from ftsup.trainer.checkpointing import Checkpointer
    from ftsup.trainer.faults import FaultInjector, StepDelay
    from ftsup.trainer.model import load_model
    from ftsup.trainer.prepared import reuse_or_prepare
    from ftsup.trainer.skipping import skip_windows_from_env, with_skipped_steps

    train = config.train
    try:
        skip = skip_windows_from_env()
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    zero = deepspeed_config(config)
    if zero is not None and resume_from is not None:
        from ftsup.trainer.zero_resize import resume_config

        zero = resume_config(zero, resume_from, dist.world_size())
    configure_determinism(train.seed)
    data = reuse_or_prepare(train, prepared)
    tokenizer, train_set, eval_set = data.tokenizer, data.train_set, data.eval_set
    args = None
    if zero is not None:
        # Before the model: under ZeRO-3, from_pretrained then loads it partitioned.
        args = training_arguments(config, has_eval=len(eval_set) > 0, deepspeed=zero)
    model = load_model(train)
    fault = FaultInjector.from_env()
    checkpointer = Checkpointer(
        config.output_dir,
        fingerprint=run_fingerprint(config),
        world_size=dist.world_size(),
        keep=train.save_total_limit,
        async_save=config.async_save,
        on_point=fault.fire if fault is not None else None,
        # A node's own copy names its ranks (the manifest's `ranks`): validation
        # then expects only their per-rank files in that node's folder.
        ranks=node_ranks() if train.save_on_each_node and multi_node() else None,
    )
    callbacks: list[Any] = [delay] if (delay := StepDelay.from_env()) is not None else []
    if fault is not None:
        callbacks.append(fault)
    progress = FtsupCallback(
        save_every=train.save_every,
        checkpointer=checkpointer,
        resumed_from=resume_from,
        skip_steps=skip,
    )
    callbacks.append(progress)
    trainer_class = with_skipped_steps(Trainer, skip)
    if config.fsdp:
        from ftsup.trainer.fsdp import with_fsdp_on_cpu

        trainer_class = with_fsdp_on_cpu(trainer_class)
    if config.async_save and config.fsdp:
        if dist.rank() == 0:
            print(
                "ftsup trainer: FSDP: every rank writes its own shards synchronously "
                "(asynchronous save is off); the manifest is sealed in the background",
                file=sys.stderr,
            )
    elif config.async_save and zero is None:
        trainer_class = with_async_save(trainer_class, checkpointer)
    elif config.async_save and dist.rank() == 0:
        print(
            "ftsup trainer: DeepSpeed: checkpoint files are written synchronously by every "
            "rank (asynchronous save is off); the manifest is sealed in the background",
            file=sys.stderr,
        )
    trainer_class = memory_tier_class(trainer_class, config, resume_from, fault, progress)
    if args is None:
        args = training_arguments(config, has_eval=len(eval_set) > 0)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set if len(eval_set) else None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return trainer, progress


def memory_tier_class(
    trainer_class: Any,
    config: RunConfig,
    resume_from: Path | None,
    fault: Any,
    progress: Any,
) -> Any:
    """`trainer_class` with the memory tier (train.json `memory`), where it can run."""
    if config.memory is None:
        return trainer_class
    from ftsup.trainer.memory_tier import DEFAULT_MAX_OVERHEAD, MemoryTier, with_memory_tier

    if dist.world_size() > 1 or config.deepspeed or config.fsdp:
        if dist.rank() == 0:
            print(
                "ftsup trainer: memory tier off: it keeps one process's state "
                "(no torchrun, DeepSpeed or FSDP)",
                file=sys.stderr,
            )
        return trainer_class
    tier = MemoryTier(
        config.memory.dir,
        config.memory.every,
        job=config.job_name,
        fingerprint=run_fingerprint(config),
        resumed_from=resume_from,
        on_point=fault.fire if fault is not None else None,
        report=progress.report,
        max_overhead=(
            DEFAULT_MAX_OVERHEAD
            if config.memory.max_overhead is None
            else config.memory.max_overhead
        ),
    )
    return with_memory_tier(trainer_class, tier)


def run_fingerprint(config: RunConfig) -> dict[str, Any]:
    """The fingerprint this run's checkpoints carry (the daemon computes the same)."""
    from ftsup.trainer.checkpointing import fingerprint
    from ftsup.trainer.deepspeed_configs import load_deepspeed_config, zero_stage

    stage = zero_stage(load_deepspeed_config(config.deepspeed)) if config.deepspeed else 0
    return fingerprint(
        config.train,
        dist.world_size(),
        global_batch=config.elastic_global_batch,
        zero_stage=stage,
        fsdp=bool(config.fsdp),
    )


def deepspeed_config(config: RunConfig) -> dict[str, Any] | None:
    """The DeepSpeed configuration (`--deepspeed`), checked against `[train]`; None: off."""
    if not config.deepspeed:
        return None
    from ftsup.trainer.deepspeed_configs import (
        DeepSpeedConfigError,
        batch_key_problems,
        load_deepspeed_config,
    )
    from ftsup.trainer.zero import prepare_process

    try:
        zero = load_deepspeed_config(config.deepspeed)
    except DeepSpeedConfigError as exc:
        raise ConfigError([str(exc)]) from None
    problems = batch_key_problems(
        zero,
        per_device=config.train.per_device_train_batch_size,
        accumulation=config.train.gradient_accumulation_steps,
        world_size=dist.world_size(),
        source=f"[launch] deepspeed = {config.deepspeed!r}",
    )
    if problems:
        raise ConfigError(problems)
    prepare_process()
    return zero


def training_arguments(
    config: RunConfig, *, has_eval: bool, deepspeed: dict[str, Any] | None = None
) -> Any:
    """`[train]` mapped onto TrainingArguments; rotation is ours, not HF's."""
    import torch
    from transformers import TrainingArguments

    train = config.train
    # One TensorBoard folder for all attempts, so curves continue across resumes.
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(config.output_dir / "runs"))
    eval_kwargs: dict[str, Any] = {"eval_strategy": "no"}
    if has_eval:
        eval_steps = train.eval_steps or train.save_steps
        eval_kwargs = (
            {"eval_strategy": "steps", "eval_steps": eval_steps}
            if eval_steps
            else {"eval_strategy": "epoch"}
        )
    distributed = dist.world_size() > 1
    cuda = torch.cuda.is_available()
    zero_kwargs: dict[str, Any] = {}
    if deepspeed is not None:
        from ftsup.trainer.zero import configure_state

        # DeepSpeed on CPU: accelerate's state is built here (use_cpu=False; see trainer/zero.py).
        zero_kwargs = {"deepspeed": deepspeed, **configure_state(timeout_s=1800)}
    elif config.fsdp:
        from ftsup.trainer.fsdp import training_kwargs

        zero_kwargs = training_kwargs(config.fsdp)
    use_cpu = zero_kwargs.pop("use_cpu", not cuda)
    return TrainingArguments(
        output_dir=str(config.output_dir),
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_steps or train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        seed=train.seed,
        data_seed=train.seed,
        bf16=train.bf16,
        fp16=train.fp16,
        save_strategy="steps",
        save_steps=train.save_steps or _NEVER,
        save_total_limit=None,  # rotation happens after the manifest (checkpointing.rotate)
        save_on_each_node=train.save_on_each_node,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        report_to=list(train.report_to) or "none",
        dataloader_num_workers=train.dataloader_num_workers,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        # Without use_cpu, accelerate on a CPU-only box shards the data across ranks
        # but never wraps the model in DDP: gradients are silently not averaged.
        use_cpu=use_cpu,
        dataloader_pin_memory=cuda,
        ddp_backend=("nccl" if cuda else "gloo") if distributed else None,
        ddp_find_unused_parameters=False if distributed else None,
        **{**eval_kwargs, **zero_kwargs},
    )
