"""Resume a DeepSpeed ZeRO checkpoint on another world size (issue 16).

Why a conversion: ZeRO-1/2/3 optimizer states (and ZeRO-3 weights) are flat
per-rank partitions; DeepSpeed's loader refuses a checkpoint whose DP world
size differs from the run's ("Automatic adjustment of ZeRO's optimizer state
partitioning ... is not currently supported"). DeepSpeed's own answer is the
universal checkpoint: `deepspeed.checkpoint.ds_to_universal` writes one
folder per parameter (`zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`)
plus the optimizer's global state, and an engine configured with
`"checkpoint": {"load_universal": true}` slices those into its own partitions
at any world size. Both run on CPU (pure torch, no compiled op).

The sealed `checkpoint-N` is never touched: rank 0 converts into
`checkpoint-N.universal/` beside it (a name the checkpoint listing, rotation
and retirement ignore: they match `checkpoint-<N>` only), built under a
temporary name and renamed when complete. That folder also gets copies of
HF's small state files (trainer state, scheduler, RNG), so HF Trainer resumes
from it as from any checkpoint: trainer state and data position from
`trainer_state.json`, the ZeRO state through `deepspeed_load_checkpoint`,
which follows `latest_universal`. It is deleted once every rank has loaded it.

Refused (exit 2) for ZeRO-1/2 with `round_robin_gradients`: DeepSpeed 0.19.8
lays each rank's flat fp32 partition out in round-robin order but links the
fragments (`param_slice_mappings`, which the converter and the universal
loader both use) in parameter order, unless some parameter is padded; the
converted values land under other parameters' names (measured: 18 of 21
tensors of the tiny model wrong). Without it the conversion is exact.
ZeRO-3's universal load shares one `step` tensor between sub-groups
(`unshare_steps` fixes it right after the load).

Stage 0 (plain data parallelism under DeepSpeed) keeps whole optimizer state
in `mp_rank_00_model_states.pt` and loads at any world size: no conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import PROGRESS_ELASTIC_CONVERT
from ftsup.trainer import dist

SUFFIX = ".universal"
DONE = "ftsup-universal.json"  # written last: the conversion finished
LATEST_UNIVERSAL = "latest_universal"
EVENT = PROGRESS_ELASTIC_CONVERT  # the daemon records it as a `resized` event
_OPTIM = re.compile(r"^(?:\w+_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_TAG = re.compile(r"^global_step\d+$")
# HF's small state files: what Trainer reads on resume besides the ZeRO state.
_HF_STATE = re.compile(r"^(trainer_state\.json|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$")


class ResizeError(ValueError):
    """The checkpoint cannot be resumed on this world size; the message says why."""


@dataclass(frozen=True)
class Resize:
    """A DeepSpeed checkpoint written by `saved_world` ranks, resumed on `world`."""

    checkpoint: Path
    tag: str
    saved_world: int
    world: int
    stage: int

    @property
    def folder(self) -> Path:
        return self.checkpoint.with_name(self.checkpoint.name + SUFFIX)

    def describe(self) -> str:
        return (
            f"ZeRO-{self.stage} checkpoint {self.checkpoint.name} written by "
            f"{self.saved_world} process(es), resumed on {self.world}"
        )


def read_tag(checkpoint: Path) -> str | None:
    """DeepSpeed's tag (`latest`), or None: not a DeepSpeed checkpoint."""
    try:
        tag = (checkpoint / "latest").read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResizeError(f"{checkpoint}: cannot read `latest` ({exc})") from None
    if not _TAG.match(tag) or not (checkpoint / tag).is_dir():
        raise ResizeError(f"{checkpoint}: `latest` names {tag!r}, which is not a tag folder")
    return tag


def saved_world_size(checkpoint: Path, tag: str) -> int:
    """The DP world size that wrote it: the rank count of its optimizer shards.

    The manifest's world size says the same for ftsup's checkpoints; the shards
    are what DeepSpeed itself goes by, and a foreign checkpoint has no manifest.
    """
    ranks = {int(m.group(1)) for p in (checkpoint / tag).iterdir() if (m := _OPTIM.match(p.name))}
    if not ranks:
        return 0
    if ranks != set(range(len(ranks))):
        raise ResizeError(f"{checkpoint / tag}: optimizer shards of ranks {sorted(ranks)}")
    return len(ranks)


def plan(checkpoint: Path, world_size: int, stage: int) -> Resize | None:
    """The conversion a resume of `checkpoint` on `world_size` ranks needs; None: none.

    Raises ResizeError where it cannot work (the trainer exits 2 with it).
    """
    tag = read_tag(checkpoint)
    if tag is None or stage == 0:
        return None
    saved = saved_world_size(checkpoint, tag)
    if saved in (0, world_size):
        return None
    return Resize(checkpoint, tag, saved, world_size, stage)


def universal_config(config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config with `checkpoint.load_universal` on (a copy)."""
    section = dict(config.get("checkpoint") or {})
    section["load_universal"] = True
    return {**config, "checkpoint": section}


def plan_for(deepspeed: str, checkpoint: Path, world_size: int) -> Resize | None:
    """`plan` for the run's `[launch] deepspeed` value (its stage decides)."""
    from ftsup.trainer.deepspeed_configs import (
        DeepSpeedConfigError,
        load_deepspeed_config,
        zero_stage,
    )

    try:
        zero = load_deepspeed_config(deepspeed)
    except DeepSpeedConfigError:
        return None  # the trainer's config check reports it
    resize = plan(checkpoint, world_size, zero_stage(zero))
    if resize is not None and resize.stage in (1, 2) and _round_robin(zero):
        raise ResizeError(
            f"{resize.describe()}: not possible with zero_optimization.round_robin_gradients "
            "= true: DeepSpeed 0.19 maps the optimizer's fp32 fragments in parameter order "
            "while round-robin lays them out in another order, so its universal checkpoint "
            "would give parameters each other's values; resume on "
            f"{resize.saved_world} process(es), or use a configuration with "
            '"round_robin_gradients": false for new runs'
        )
    return resize


def _round_robin(zero: dict[str, Any]) -> bool:
    section = zero.get("zero_optimization")
    return isinstance(section, dict) and section.get("round_robin_gradients") is True


def resume_config(zero: dict[str, Any], checkpoint: Path, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config a resume of `checkpoint` needs: universal loading on a resize."""
    return universal_config(zero) if plan(checkpoint, world_size, zero_stage_of(zero)) else zero


def zero_stage_of(zero: dict[str, Any]) -> int:
    from ftsup.trainer.deepspeed_configs import zero_stage

    return zero_stage(zero)


def _is_done(folder: Path, resize: Resize) -> bool:
    try:
        done = json.loads((folder / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(done.get("source") == str(resize.checkpoint) and done.get("tag") == resize.tag)


def _convert_into(resize: Resize, folder: Path) -> None:
    """DeepSpeed's converter (one worker: no process pool inside a training rank)."""
    from deepspeed.checkpoint import ds_to_universal  # type: ignore[import-untyped,import-not-found]

    args = argparse.Namespace(
        input_folder=str(resize.checkpoint / resize.tag),
        output_folder=str(folder / resize.tag),  # latest_universal goes to its parent
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # HF models carry no universal_checkpoint_info; a plain DP model needs none.
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(sys.stderr):  # its progress prints belong in the log
        ds_to_universal.main(args)
    if (folder / LATEST_UNIVERSAL).read_text(encoding="utf-8").strip() != resize.tag:
        raise ResizeError(f"{folder}: the converter wrote no {LATEST_UNIVERSAL} for {resize.tag}")
    for item in resize.checkpoint.iterdir():
        if _HF_STATE.match(item.name) and item.is_file():
            shutil.copy2(item, folder / item.name)


def build(resize: Resize) -> Path:
    """Rank 0's part: `checkpoint-N.universal/`, converted once (reused when complete)."""
    folder = resize.folder
    if _is_done(folder, resize):
        return folder
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        _convert_into(resize, temporary)
        (temporary / DONE).write_text(
            json.dumps({"source": str(resize.checkpoint), "tag": resize.tag}), encoding="utf-8"
        )
        shutil.rmtree(folder, ignore_errors=True)  # a stale, unfinished one
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder


def convert(resize: Resize) -> Path:
    """On every rank: rank 0 converts, the others wait; the folder to resume from.

    A failure on rank 0 is shared with every rank (any_rank is a collective),
    so no rank waits forever for a conversion that died.
    """
    from ftsup.trainer.progress import ProgressWriter

    started = time.monotonic()
    error: BaseException | None = None
    if dist.rank() == 0:
        print(
            f"ftsup trainer: {resize.describe()}: converting to DeepSpeed's universal "
            f"checkpoint in {resize.folder}",
            file=sys.stderr,
        )
        try:
            build(resize)
        except Exception as exc:  # reported below, after the other ranks know
            error = exc
    (failed,) = dist.any_rank(error is not None)
    if failed:
        if error is not None:
            raise ResizeError(
                f"{resize.describe()}: conversion to a universal checkpoint failed: {error}"
            ) from error
        raise ResizeError(f"{resize.describe()}: rank 0 could not convert the checkpoint")
    seconds = round(time.monotonic() - started, 3)
    if dist.rank() == 0:
        ProgressWriter.from_env().emit(
            EVENT,
            checkpoint=str(resize.checkpoint),
            step=_step(resize.tag),
            universal=str(resize.folder),
            from_world_size=resize.saved_world,
            to_world_size=resize.world,
            zero_stage=resize.stage,
            seconds=seconds,
        )
        print(
            f"ftsup trainer: universal checkpoint ready in {seconds:.1f} s; loading it on "
            f"{resize.world} process(es)",
            file=sys.stderr,
        )
    return resize.folder


def discard(resize: Resize) -> None:
    """After every rank loaded it: the universal copy is not needed any more."""
    dist.barrier()
    if dist.rank() == 0:
        shutil.rmtree(resize.folder, ignore_errors=True)


def unshare_steps(optimizer: Any) -> int:
    """Give each optimizer state its own `step` tensor; how many were shared.

    DeepSpeed 0.19.8's ZeRO-3 universal load assigns one `step` tensor to
    every sub-group's state; torch's AdamW increments `step` in place once
    per sub-group, so with two groups (HF's decay and no-decay) the count
    advanced by 2 per step and Adam's bias correction went wrong (measured:
    step 4's loss off by 4e-5 relative, step 5's by 5e-3).
    """
    import torch

    inner = optimizer
    while hasattr(inner, "optimizer"):  # HF/accelerate wrapper -> ZeRO -> torch
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        return 0
    seen: set[int] = set()
    fixed = 0
    for state in inner.state.values():
        step = state.get("step")
        if not torch.is_tensor(step):
            continue
        if id(step) in seen:
            state["step"] = step.clone()
            fixed += 1
        seen.add(id(step))
    return fixed


def after_load(resize: Resize) -> Any:
    """A callback for the loaded state: fix shared `step`s, delete the universal copy.

    HF loads the ZeRO state before `on_train_begin`, on every rank; the RNG
    files it reads later belong to the old world size's ranks anyway (a
    one-process run looks for `rng_state.pth`), so nothing is lost.
    """
    from transformers import TrainerCallback

    class AfterUniversalLoad(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            unshare_steps(kw.get("optimizer"))
            discard(resize)

    return AfterUniversalLoad()


def _step(tag: str) -> int:
    return int(tag.removeprefix("global_step"))


__all__ = [
    "DONE",
    "EVENT",
    "Resize",
    "ResizeError",
    "after_load",
    "build",
    "convert",
    "discard",
    "plan",
    "plan_for",
    "read_tag",
    "resume_config",
    "saved_world_size",
    "universal_config",
    "unshare_steps",
]
