"""`FtsupCallback`: progress events and signal-driven checkpoints for any HF Trainer.

Add it to any `transformers.Trainer` script:

    from ftsup.trainer import FtsupCallback
    trainer = Trainer(..., callbacks=[FtsupCallback()])

and the script writes `FTSUP_PROGRESS_FILE`, saves a checkpoint and stops on
SIGTERM/SIGUSR1 (the script then exits as it likes; `FtsupCallback.stopped`
says why training ended), and saves without stopping on SIGUSR2. The built-in
trainer also passes a `Checkpointer`, which makes each checkpoint complete
with a manifest and rotates old ones.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ftsup.supervisor.contract import checkpoint_name
from ftsup.trainer import dist
from ftsup.trainer.checkpointing import (
    Checkpointer,
    hand_over_rank_shards,
    retire_checkpoints_after,
)
from ftsup.trainer.progress import ProgressWriter, train_start_fields
from ftsup.trainer.signals import REQUESTS, install_handlers
from ftsup.trainer.skipping import in_windows


class TrainingComplete(Exception):
    """A run resumed at `max_steps`: there is nothing left to train. Raised at the
    first epoch, before HF trains (it checks for the end only after a step, so it
    would train step max_steps + 1 and change the finished weights); the
    instrumentation's `train` catches it (`end_at_max_steps`)."""


class FtsupCallback(TrainerCallback):  # type: ignore[misc]
    """Report progress; turn stop/save requests into saves at step boundaries."""

    # Raise TrainingComplete at the first epoch of a run resumed at max_steps (set by
    # the instrumentation, whose `train` catches it; the built-in trainer never
    # starts such a run: `run.already_finished`).
    end_at_max_steps = False

    def __init__(
        self,
        progress_file: str | Path | None = None,
        *,
        save_every: float | None = None,
        checkpointer: Checkpointer | None = None,
        resumed_from: str | Path | None = None,
        install_signal_handlers: bool = True,
        skip_steps: Sequence[tuple[int, int]] = (),
    ) -> None:
        """`progress_file` defaults to `$FTSUP_PROGRESS_FILE`; `save_every` is in seconds;
        steps in `skip_steps` windows are reported with `"skipped": true` and no loss."""
        self.progress = (
            ProgressWriter(progress_file) if progress_file else ProgressWriter.from_env()
        )
        self.save_every = save_every
        self.checkpointer = checkpointer
        self.resumed_from = str(resumed_from) if resumed_from else None
        self.stopped = False  # True once training ended on a stop request
        self.skip_steps = tuple(skip_steps)
        if install_signal_handlers:
            install_handlers()
        if checkpointer is not None and checkpointer.on_saved is None:
            checkpointer.on_saved = self._report_saved
        self._last_save = time.monotonic()
        self._last_step_time = time.monotonic()
        self._last_tokens = 0
        self._tokens_per_s: float | None = None
        self._save_started = time.monotonic()
        self._start_pending = False
        self._is_zero = dist.rank() == 0
        # Progress lines come from every node's first process: each node's daemon
        # follows its own trainer (a multi-node run); checkpoints are rank 0's.
        self._reports = dist.local_rank() == 0
        # Who seals, rotates and retires: rank 0 in a shared folder, each node's
        # first process in its own folder (`save_on_each_node`).
        self._seals = self._is_zero

    # ------------------------------------------------------------- lifecycle

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._is_zero = state.is_world_process_zero
        self._reports = state.is_local_process_zero
        node_local = bool(getattr(args, "save_on_each_node", False))
        self._seals = state.is_local_process_zero if node_local else self._is_zero
        if self.checkpointer is not None:
            # Steps after the resume point will be written again: move leftovers away
            # (node-local: also the newer copies that not every node held).
            if self._seals:
                retire_checkpoints_after(Path(str(args.output_dir)), state.global_step)
            dist.barrier()
        now = time.monotonic()
        self._last_save = self._last_step_time = now
        self._last_tokens = state.num_input_tokens_seen
        resumed = self.resumed_from or getattr(args, "resume_from_checkpoint", None)
        fields = train_start_fields(
            step=state.global_step,
            max_steps=state.max_steps,
            resumed=resumed,
            world_size=args.world_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
        self._emit("train_start", **fields)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.end_at_max_steps and 0 < args.max_steps <= state.global_step:
            self._emit("train_end", step=state.global_step, reason="finished")
            raise TrainingComplete(state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._measure_throughput(state)
        timed = (
            self.save_every is not None
            and self._is_zero
            and time.monotonic() - self._last_save >= self.save_every
        )
        stop, save = dist.any_rank(REQUESTS.stop, REQUESTS.save or timed)
        REQUESTS.save = False
        if stop:
            REQUESTS.stop = False
            # A stop during the last step is just the end of training (exit 0).
            self.stopped = state.global_step < state.max_steps
            control.should_training_stop = True
        if stop or save:
            control.should_save = True
        if control.should_save:
            self._save_started = time.monotonic()
            self._start_pending = True  # announced right after this step's event
        if not control.should_log:  # otherwise on_log reports this step, with its loss
            self._emit_step(state, {})

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if logs and "loss" in logs:
            self._emit_step(state, logs)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self._emit("eval", step=state.global_step, eval_loss=metrics["eval_loss"])
        self._save_started = time.monotonic()  # a save that follows starts now

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._announce_save(state)  # if no step event came first (should not happen)
        ckpt = Path(str(args.output_dir)).absolute() / checkpoint_name(state.global_step)
        self._last_save = time.monotonic()
        if self.checkpointer is None:
            seconds = time.monotonic() - self._save_started
            self._report_saved(ckpt, state.global_step, seconds, seconds)
            return
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            if self.checkpointer.on_point is not None:
                self.checkpointer.on_point(state.global_step, "before_handover")  # tests
            hand_over_rank_shards(ckpt, dist.rank())  # while its shards are hot in the cache
        # Every rank's foreground files (rng_state_<rank>.pth, or all of HF's) are on
        # disk, on every node: no folder (shared or node-local) is sealed before.
        dist.barrier()
        if self.checkpointer.async_save:
            # Training goes on now: the stall ends here, the manifest comes later.
            stall = time.monotonic() - self._save_started
            if self._seals:
                self.checkpointer.finalize(
                    ckpt, state.global_step, self._save_started, stall_s=stall
                )
            return
        if self._seals:
            self.checkpointer.finalize(ckpt, state.global_step, self._save_started)
        dist.barrier()  # no rank moves on (or exits) before the manifest exists

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.checkpointer is not None:
            if self._seals:
                self.checkpointer.wait()
            dist.barrier()
        self._emit(
            "train_end", step=state.global_step, reason="stopped" if self.stopped else "finished"
        )
        self.progress.close()
        if self.progress.dropped:  # a full or failing disk; training itself went on
            with contextlib.suppress(OSError, ValueError):
                print(
                    f"ftsup: {self.progress.dropped} progress events could not be written "
                    f"({self.progress.last_error})",
                    file=sys.stderr,
                    flush=True,
                )

    # --------------------------------------------------------------- helpers

    def _measure_throughput(self, state: TrainerState) -> None:
        now = time.monotonic()
        tokens = state.num_input_tokens_seen
        elapsed = now - self._last_step_time
        if tokens > self._last_tokens and elapsed > 0:
            self._tokens_per_s = (tokens - self._last_tokens) / elapsed
        self._last_step_time, self._last_tokens = now, tokens

    def _emit_step(self, state: TrainerState, logs: dict[str, float]) -> None:
        extra: dict[str, Any] = {}
        if in_windows(state.global_step, self.skip_steps):
            logs, extra = {}, {"skipped": True}  # no loss: this step's data was not used
        self._emit(
            "step",
            step=state.global_step,
            max_steps=state.max_steps,
            loss=logs.get("loss"),
            lr=logs.get("learning_rate"),
            grad_norm=logs.get("grad_norm"),
            tokens_per_s=None if self._tokens_per_s is None else round(self._tokens_per_s, 1),
            epoch=state.epoch,
            **extra,
        )
        self._announce_save(state)

    def _announce_save(self, state: TrainerState) -> None:
        """`checkpoint_start` after the saving step's event: the daemon's hang detector
        and goodput accounting then attribute the slow interval that follows to the save."""
        if self._start_pending:
            self._start_pending = False
            self._emit("checkpoint_start", step=state.global_step)

    def _report_saved(self, ckpt: Path, step: int, seconds: float, stall_s: float) -> None:
        """`seconds`: step end to manifest on disk; `stall_s`: of that, training was blocked."""
        self._emit(
            "checkpoint_saved",
            step=step,
            path=str(ckpt),
            seconds=round(seconds, 3),
            stall_s=round(stall_s, 3),
        )

    def report(self, event: str, **fields: Any) -> None:
        """One progress line of the caller's (each node's first process writes it)."""
        self._emit(event, **fields)

    def _emit(self, event: str, **fields: Any) -> None:
        if self._reports:
            self.progress.emit(event, **fields)
