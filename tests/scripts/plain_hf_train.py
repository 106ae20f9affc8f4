"""A plain Hugging Face Trainer script, written as users write them: it knows nothing
of ftsup (tests/test_instrumented_jobs.py runs it as a `[command]` job and proves
that ftsup's bootstrap instruments it without a change).

It fine-tunes a causal LM from `--model_name_or_path` (a local folder the test
builds; any hub name works the same) on additions it generates itself, with every
flag of `TrainingArguments` on the command line, resumes like `run_clm.py`
(`--resume_from_checkpoint PATH`), and saves the final model to `--output_dir`.

Test hook (the only thing a real script would not have): `--hold_dir DIR` makes
the run wait before step N+1 while `DIR/hold-N` exists, so that a test can act at
a known step however fast or slow the machine is.

    python plain_hf_train.py --model_name_or_path MODEL --output_dir OUT \
        --max_steps 30 --save_steps 10 --logging_steps 1 --use_cpu --seed 0
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "a model folder or hub name"})
    num_rows: int = field(default=128, metadata={"help": "size of the generated data set"})
    max_length: int = field(default=24, metadata={"help": "tokens per example"})
    hold_dir: str | None = field(default=None, metadata={"help": "test hook, see the docstring"})


def make_rows(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 50), rng.randint(0, 50)) for _ in range(n)]
    return [f"{a}+{b}={a + b}" for a, b in pairs]


class Sums(torch.utils.data.Dataset):  # type: ignore[misc,type-arg]
    """Tokenized, padded to one length: the default collator needs no tokenizer."""

    def __init__(self, tokenizer: Any, rows: list[str], max_length: int) -> None:
        enc = tokenizer(rows, padding="max_length", truncation=True, max_length=max_length)
        self.items = []
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True):
            labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
            self.items.append(
                {
                    "input_ids": torch.tensor(ids),
                    "attention_mask": torch.tensor(mask),
                    "labels": torch.tensor(labels),
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class HoldCallback(TrainerCallback):  # type: ignore[misc]
    """Test hook: wait before the next step while `hold-<step>` exists."""

    def __init__(self, hold_dir: str) -> None:
        self.hold_dir = Path(hold_dir)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        hold = self.hold_dir / f"hold-{state.global_step}"
        while hold.exists():
            time.sleep(0.02)


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))  # type: ignore[arg-type]
    script_args, training_args = parser.parse_args_into_dataclasses()
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path)
    rows = make_rows(script_args.num_rows, training_args.seed)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Sums(tokenizer, rows, script_args.max_length),
        processing_class=tokenizer,
        callbacks=[HoldCallback(script_args.hold_dir)] if script_args.hold_dir else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()


if __name__ == "__main__":
    main()
