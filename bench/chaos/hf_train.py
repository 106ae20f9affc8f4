"""The chaos benchmark's baseline: plain transformers Trainer, no ftsup supervisor.

It trains the same model on the same data with the same TrainingArguments as
the built-in trainer (built with the `ftsup.trainer` data/model helpers, so the
two modes differ only in how they are supervised and checkpointed), and HF
rotates its own checkpoints. A tiny callback appends per-step timestamps to a
JSONL file in the format of ftsup's `progress.jsonl`, so that the benchmark
measures both modes from the same kind of record.

    python bench/chaos/hf_train.py --config train.json --output_dir OUT \
        --progress progress.jsonl [--resume_from_checkpoint OUT/checkpoint-N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from ftsup.trainer.batching import ExampleDataset, PadCollator
from ftsup.trainer.config import RunConfig, train_section_from_dict
from ftsup.trainer.data import encode_all, load_conversations, split_eval
from ftsup.trainer.model import load_model, load_tokenizer
from ftsup.trainer.run import configure_determinism, training_arguments


class StepLog(TrainerCallback):
    """Appends `step`, `checkpoint_start` and `checkpoint_saved` lines (one write each)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._save_started = 0.0

    def _emit(self, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._emit("train_start", step=state.global_step, max_steps=state.max_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # DefaultFlowCallback ran first, so `should_save` says whether a save follows.
        self._emit("step", step=state.global_step, max_steps=state.max_steps)
        if control.should_save:
            self._save_started = time.monotonic()
            self._emit("checkpoint_start", step=state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        seconds = round(time.monotonic() - self._save_started, 3)
        self._emit("checkpoint_saved", step=state.global_step, seconds=seconds)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._emit("train_end", step=state.global_step, reason="finished")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the job's [train] as JSON")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--progress", type=Path, required=True)
    parser.add_argument("--resume_from_checkpoint", default=None)
    args = parser.parse_args()

    train = train_section_from_dict(json.loads(args.config.read_text()))
    config = RunConfig(train=train, output_dir=args.output_dir)
    configure_determinism(train.seed)
    rows, _ = split_eval(
        load_conversations(train.dataset, train.format), train.val_size, train.seed
    )
    tokenizer = load_tokenizer(train)
    targs = training_arguments(config, has_eval=False)
    targs.save_total_limit = train.save_total_limit  # plain HF rotates by itself
    trainer = Trainer(
        model=load_model(train),
        args=targs,
        train_dataset=ExampleDataset(encode_all(tokenizer, rows, train.cutoff_len)),
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[StepLog(args.progress)],
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
