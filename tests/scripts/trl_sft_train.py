"""A plain TRL `SFTTrainer` script, written as users write them: it knows nothing of
ftsup (tests/test_instrumented_jobs.py runs it as a `[command]` job and proves that
ftsup's bootstrap instruments `SFTTrainer`, a `transformers.Trainer` subclass).

It fine-tunes `--model_name_or_path` (a local folder the test builds; any hub
name works the same) on chat conversations it generates itself (TRL applies the
tokenizer's chat template), with every `SFTConfig` flag on the command line,
resumes with `--resume_from_checkpoint PATH` as TRL's own `sft.py` does, and
saves the final model to `--output_dir`.

Test hook (the only thing a real script would not have): `--hold_dir DIR` makes
the run wait before step N+1 while `DIR/hold-N` exists, so that a test can act at
a known step however fast or slow the machine is.

    python trl_sft_train.py --model_name_or_path MODEL --output_dir OUT \
        --max_steps 30 --save_steps 10 --logging_steps 1 --use_cpu --seed 0
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset  # type: ignore[import-untyped]
from transformers import AutoTokenizer, HfArgumentParser, TrainerCallback
from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "a model folder or hub name"})
    num_rows: int = field(default=96, metadata={"help": "conversations to generate"})
    hold_dir: str | None = field(default=None, metadata={"help": "test hook, see the docstring"})


def make_conversations(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a}+{b}?"},
                    {"role": "assistant", "content": str(a + b)},
                ]
            }
        )
    return Dataset.from_list(rows)


class HoldCallback(TrainerCallback):  # type: ignore[misc]
    """Test hook: wait before the next step while `hold-<step>` exists."""

    def __init__(self, hold_dir: str) -> None:
        self.hold_dir = Path(hold_dir)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        hold = self.hold_dir / f"hold-{state.global_step}"
        while hold.exists():
            time.sleep(0.02)


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, SFTConfig))  # type: ignore[arg-type]
    script_args, training_args = parser.parse_args_into_dataclasses()
    trainer = SFTTrainer(
        model=script_args.model_name_or_path,
        args=training_args,
        train_dataset=make_conversations(script_args.num_rows, training_args.seed),
        processing_class=AutoTokenizer.from_pretrained(script_args.model_name_or_path),
        callbacks=[HoldCallback(script_args.hold_dir)] if script_args.hold_dir else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
