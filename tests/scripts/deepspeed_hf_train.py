"""A user's Hugging Face Trainer script with a DeepSpeed config: it knows nothing of ftsup.

`tests/test_command_deepspeed.py` runs it as a `[command]` job under torchrun
with two ranks and `--deepspeed ds_zero2.json` (a full fine-tune, ZeRO-2), kills
it after a checkpoint, and checks that the daemon resumes it from the newest
valid checkpoint to the same weights as an uninterrupted run.

It fine-tunes a causal LM from `--model_name_or_path` (a local folder) on
additions it generates itself, takes every `TrainingArguments` flag on the
command line (`--deepspeed CONFIG.json` among them), resumes like `run_clm.py`
(`--resume_from_checkpoint PATH`) and saves the final model to `--output_dir`.

    torchrun --nproc_per_node 2 deepspeed_hf_train.py --model_name_or_path MODEL \
        --output_dir OUT --deepspeed ds_zero2.json --max_steps 8 --save_steps 2

On a GPU host this is all a DeepSpeed script needs. On a CPU-only host (CI)
transformers' DeepSpeed route needs a prelude, see `cpu_only_prelude`.

Test hook (the only thing a real script would not have): `--hold_dir DIR` makes
every rank wait before step N+1 while `DIR/hold-N` exists; while waiting, rank R
keeps `DIR/held-N-rankR` holding its pid, so a test knows that all ranks are
there, and which processes to kill.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "a model folder or hub name"})
    num_rows: int = field(default=128, metadata={"help": "size of the generated data set"})
    max_length: int = field(default=24, metadata={"help": "tokens per example"})
    hold_dir: str | None = field(default=None, metadata={"help": "test hook, see the docstring"})


def cpu_only_prelude(argv: list[str]) -> list[str]:
    """DeepSpeed through HF Trainer on CPU processes; the arguments to parse.

    A GPU user needs none of this: with CUDA it returns `argv` unchanged and
    touches nothing. Without CUDA, transformers builds accelerate's state with
    no backend for DeepSpeed, accelerate then counts one process and DeepSpeed
    refuses the batch size ("train_batch_size 2 != 2 * 1 * 2"). So: DeepSpeed's
    CPU accelerator; no JIT build of its shm all-reduce op (about 80 s of C++,
    used only by inference); accelerate's state built here with gloo and the
    DeepSpeed flag; and TrainingArguments told to use that state (`use_cpu`
    must stay off, or DeepSpeed is never selected).
    """
    if torch.cuda.is_available():
        return argv
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops  # type: ignore[import-untyped,import-not-found]
    from accelerate.state import PartialState

    compatible = dict(vars(deepspeed.ops).get("__compatible_ops__") or {})
    compatible["deepspeed_shm_comm"] = False  # read by deepspeed/comm/torch.py
    deepspeed.ops.__compatible_ops__ = compatible
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    if "--accelerator_config" in argv:
        return argv
    return [*argv, "--accelerator_config", '{"use_configured_state": true}']


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


def hold_callback(hold_dir: str) -> Any:
    """Test hook: wait before the next step while `hold-<step>` exists (every rank)."""
    from transformers import TrainerCallback

    class HoldCallback(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            hold = Path(hold_dir) / f"hold-{state.global_step}"
            if not hold.exists():
                return
            held = Path(hold_dir) / f"held-{state.global_step}-rank{args.process_index}"
            held.write_text(f"{os.getpid()}\n")
            while hold.exists():
                time.sleep(0.02)
            held.unlink(missing_ok=True)

    return HoldCallback()


def main() -> None:
    argv = cpu_only_prelude(sys.argv[1:])
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        HfArgumentParser,
        Trainer,
        TrainingArguments,
    )

    parser = HfArgumentParser((ScriptArguments, TrainingArguments))  # type: ignore[arg-type]
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path)
    rows = make_rows(script_args.num_rows, training_args.seed)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Sums(tokenizer, rows, script_args.max_length),
        processing_class=tokenizer,
        callbacks=[hold_callback(script_args.hold_dir)] if script_args.hold_dir else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    if torch.distributed.is_initialized():  # a clean end for every rank under torchrun
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
