"""Asynchronous checkpoints: snapshot the training state to host memory, write it later.

Hugging Face Trainer writes a checkpoint on the training thread, so training
stalls for the whole write. Here the foreground part of a save only copies
what training will change next (trainable weights, optimizer, scheduler and
scaler state, trainer state) into host buffers, writes the few-KB RNG file
(every rank's must be on disk at the barrier in `FtsupCallback.on_save`, and
only rank 0 has a writer), and returns; the checkpointer's worker thread then
writes the same files HF would (same names and formats: safetensors weights,
`torch.save` for optimizer.pt / scheduler.pt / scaler.pt, trainer_state.json
last) and seals the folder with the manifest. Until then the folder has no
manifest, so a kill leaves the previous checkpoint the newest complete one.
Each file is checksummed right after it is written (its bytes are still in
the page cache) and the entries go to the seal in a manifest part file, so
sealing only fsyncs and assembles (`ftsup.supervisor.manifest`).

At most one save is in flight: the next save first waits for the previous
one (that save is delayed, neither is corrupted), which also makes reusing
the host buffers safe. On GPU the buffers are pinned and filled with
non-blocking copies followed by one synchronize.

The file writing (`write_files`) is shared with the memory tier
(`ftsup.trainer.memory_snapshot.materialize`), which turns a snapshot in RAM
back into the folder this writer would have written.
"""

from __future__ import annotations

import copy
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftsup.supervisor.contract import checkpoint_name
from ftsup.supervisor.manifest import FileEntry, entry_for, iter_checkpoint_files, write_part
from ftsup.trainer import faults
from ftsup.trainer.checkpointing import Checkpointer

# The file names HF Trainer uses (transformers.trainer), kept identical.
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.bin"
RNG_STATE_NAME = "rng_state.pth"  # one process; rank r of several writes rng_state_<r>.pth
# Written by every rank on its training thread, maybe while this writer runs:
# never checksummed here (the seal does it, after the barrier).
_RNG_FILE = re.compile(r"rng_state(_\d+)?\.pth")


class WrittenFiles:
    """Checksums of the files this writer produced, taken right after each write."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.entries: dict[str, FileEntry] = {}

    def update(self) -> None:
        """Checksum every file that is new or changed since the last call."""
        for file in iter_checkpoint_files(self.folder):
            if _RNG_FILE.fullmatch(file.name):
                continue
            rel = file.relative_to(self.folder).as_posix()
            st = os.stat(file)
            old = self.entries.get(rel)
            if old is None or (old.size, old.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self.entries[rel] = entry_for(self.folder, file)

    def hand_over(self, name: str) -> None:
        """Leave the entries for the seal (a manifest part file)."""
        write_part(self.folder, name, self.entries.values())


class HostBuffers:
    """Host copies of tensors, reused from one save to the next.

    Reuse matters: first-touching a fresh gigabyte (page faults, zeroing)
    costs about as much as copying into it. Safe because at most one save is
    in flight, and the next snapshot starts only after its write finished.
    """

    def __init__(self, *, pin: bool) -> None:
        self.pin = pin
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        source = tensor.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(
                source.shape, dtype=source.dtype, device="cpu", pin_memory=self.pin
            )
            self._buffers[key] = buffer
        buffer.copy_(source, non_blocking=self.pin and source.device.type == "cuda")
        return buffer

    def to_host(self, value: Any, key: str) -> Any:
        """`value` (nested dicts/lists/tuples) with every tensor copied to host memory."""
        if isinstance(value, torch.Tensor):
            return self.copy(key, value)
        if isinstance(value, dict):
            return {k: self.to_host(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.to_host(v, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(self.to_host(v, f"{key}.{i}") for i, v in enumerate(value))
        return copy.deepcopy(value)


def model_snapshot(model: torch.nn.Module, buffers: HostBuffers) -> dict[str, torch.Tensor]:
    """The model's state dict with trainable parameters and buffers copied to host.

    Frozen parameters (a LoRA run's whole base model) never change during
    training, so they are passed by reference instead of copied; peft's
    `save_pretrained` keeps only the adapter's keys of it anyway. Tied
    tensors stay tied (one copy per parameter object).
    """
    copies: dict[int, torch.Tensor] = {}
    snapshot: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad:
            snapshot[name] = tensor.detach()
            continue
        if id(tensor) not in copies:
            copies[id(tensor)] = buffers.copy(f"model.{name}", tensor)
        snapshot[name] = copies[id(tensor)]
    return snapshot


@dataclass(frozen=True)
class Captured:
    """A checkpoint's contents, copied off the live training objects."""

    step: int
    rank: int
    model: Any  # writes the weights (`save_pretrained`), never read from
    weights: dict[str, torch.Tensor]
    optimizer: Any
    scheduler: Any
    scaler: Any | None
    state: Any  # a TrainerState
    tokenizer: Any | None
    args: Any  # TrainingArguments, written as training_args.bin


# The disk writer runs on its own thread beside the training thread, and `save_pretrained` is not
# made for that: peft's flips the adapter config's `inference_mode` and back.
_SAVE_PRETRAINED = threading.Lock()

# (fault point or None, write one file): lets each writer checksum and inject faults
PartRunner = Callable[[str | None, Callable[[], object]], None]


def copy_state(state: Any) -> Any:
    """A deep copy of a TrainerState, except that `log_history`'s entries are shared.

    HF appends a new dict per log and never changes one afterwards, while the
    history grows with every logged step: copying its entries each step (the
    memory tier) would cost more as training goes on.
    """
    history = state.log_history
    return copy.deepcopy(state, {id(history): list(history)})


def capture(trainer: Any, buffers: HostBuffers) -> Captured:
    """Copy what training will change next into `buffers` (on the training thread).

    As HF's `_save_checkpoint`, records the exportable callbacks' state in
    `trainer.state.stateful_callbacks` first.
    """
    weights = model_snapshot(trainer.model, buffers)
    optimizer = buffers.to_host(trainer.optimizer.state_dict(), "optimizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF silences the same scheduler warnings
        scheduler = copy.deepcopy(trainer.lr_scheduler.state_dict())
    scaler_obj = getattr(trainer.accelerator, "scaler", None)
    scaler = None if scaler_obj is None else copy.deepcopy(scaler_obj.state_dict())
    state = trainer.state
    record_callback_states(trainer)
    if buffers.pin:
        torch.cuda.synchronize()  # the non-blocking copies have landed
    return Captured(
        step=state.global_step,
        rank=trainer.args.process_index,
        model=trainer.model,
        weights=weights,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        state=copy_state(state),
        tokenizer=trainer.processing_class,
        args=trainer.args,
    )


def record_callback_states(trainer: Any) -> None:
    """As HF's `_save_checkpoint` does first: the exportable callbacks' state goes
    into `trainer.state.stateful_callbacks`."""
    from transformers.trainer_callback import ExportableState

    state = trainer.state
    for cb in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(cb, ExportableState):
            name, cb_state = cb.__class__.__name__, cb.state()
            if isinstance(state.stateful_callbacks[name], list):
                state.stateful_callbacks[name].append(cb_state)
            else:
                state.stateful_callbacks[name] = cb_state


def rng_states(trainer: Any) -> dict[str, Any]:
    """What HF's `_save_rng_state` writes (CPU and CUDA), taken now, written later.

    Each getter returns a copy, so training may go on drawing numbers.
    """
    import random

    import numpy as np
    from transformers.training_args import ParallelMode

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        if trainer.args.parallel_mode == ParallelMode.DISTRIBUTED:
            states["cuda"] = torch.cuda.random.get_rng_state_all()
        else:
            states["cuda"] = torch.cuda.random.get_rng_state()
    return states


def write_files(
    captured: Captured,
    output_dir: Path,
    part: PartRunner,
    *,
    save_tokenizer: Callable[[Any, Path], None] | None = None,
) -> None:
    """Write HF's checkpoint files (not the RNG file) in HF's formats, trainer state last.

    `save_tokenizer(tokenizer, folder)` replaces the tokenizer's `save_pretrained`
    (the memory tier links the files of its previous snapshot instead).
    """
    out = str(output_dir)
    os.makedirs(output_dir, exist_ok=True)

    def weights() -> None:
        with _SAVE_PRETRAINED:
            captured.model.save_pretrained(out, state_dict=captured.weights, is_main_process=True)

    part("after_weights", weights)
    tokenizer = captured.tokenizer
    if tokenizer is not None:

        def tokenizer_files() -> None:
            with _SAVE_PRETRAINED:
                if save_tokenizer is None:
                    tokenizer.save_pretrained(out)
                else:
                    save_tokenizer(tokenizer, output_dir)

        part(None, tokenizer_files)
    part(None, lambda: torch.save(captured.args, output_dir / TRAINING_ARGS_NAME))
    part("after_optimizer", lambda: torch.save(captured.optimizer, output_dir / OPTIMIZER_NAME))
    part("after_scheduler", lambda: torch.save(captured.scheduler, output_dir / SCHEDULER_NAME))
    if captured.scaler is not None:
        part(None, lambda: torch.save(captured.scaler, output_dir / SCALER_NAME))
    part(
        "after_trainer_state",
        lambda: captured.state.save_to_json(str(output_dir / TRAINER_STATE_NAME)),
    )


def plain_layout_models() -> tuple[type, ...]:
    """The model classes whose checkpoints the background writers can produce."""
    from transformers import PreTrainedModel

    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency of the trainer
        return (PreTrainedModel,)
    return (PreTrainedModel, PeftModel)


def with_async_save(trainer_class: Any, checkpointer: Checkpointer) -> Any:
    """A subclass of `trainer_class` whose checkpoints are written in the background.

    Falls back to HF's synchronous save where the layout is not plain
    (DeepSpeed, FSDP, a model that is not a PreTrainedModel / PeftModel,
    push_to_hub, best-model tracking).
    """
    supported = plain_layout_models()

    class AsyncSaveTrainer(trainer_class):  # type: ignore[misc,valid-type]
        _ftsup_buffers: HostBuffers | None = None

        def _async_supported(self) -> bool:
            args = self.args
            return (
                checkpointer.async_save
                and not self.is_deepspeed_enabled
                and not self.is_fsdp_enabled
                and isinstance(self.model, supported)
                and not args.push_to_hub
                and not args.load_best_model_at_end
                and not args.save_only_model
                and args.save_total_limit is None
            )

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            if not self._async_supported():
                super()._save_checkpoint(model, trial)
                return
            # At most one save in flight: this one waits for the previous write.
            checkpointer.wait_idle()
            if self.hp_search_backend is None and trial is None:
                self.store_flos()
            step = self.state.global_step
            output_dir = Path(self._get_output_dir(trial=trial)) / checkpoint_name(step)
            write = self._snapshot(output_dir) if self.args.should_save else None
            self._save_rng_state(str(output_dir))  # tiny; every rank's file, now
            if write is not None:
                checkpointer.submit(output_dir, step, write)

        def _snapshot(self, output_dir: Path) -> Callable[[], None]:
            """Copy what training will change to host memory; return the writer."""
            if self._ftsup_buffers is None:
                self._ftsup_buffers = HostBuffers(pin=torch.cuda.is_available())
            captured = capture(self, self._ftsup_buffers)

            def write() -> None:
                delay = faults.write_delay()
                written = WrittenFiles(output_dir)

                def part(point: str | None, action: Callable[[], object]) -> None:
                    if delay:
                        time.sleep(delay)
                    action()
                    written.update()  # while the bytes are hot in the page cache
                    if point is not None and checkpointer.on_point is not None:
                        checkpointer.on_point(captured.step, point)  # fault injection (tests)

                write_files(captured, output_dir, part)
                written.hand_over(f"rank-{captured.rank}")
                # The manifest (fsync of every file, then the seal) is the checkpointer's.

            return write

    AsyncSaveTrainer.__name__ = AsyncSaveTrainer.__qualname__ = f"AsyncSave{trainer_class.__name__}"
    return AsyncSaveTrainer
