"""Supervised fine-tuning with TRL's `SFTTrainer`: a plain script, nothing ftsup-specific.

ftsup instruments it from the outside (live progress, `ftsup stop` saves where it
is, `ftsup save` saves now) and passes `--resume_from_checkpoint` when it resumes.
Every `SFTConfig` flag (transformers' `TrainingArguments` plus TRL's) and TRL's
`ModelConfig` flags (`--use_peft`, `--lora_r`, ...) work on the command line, or
in a YAML file given with `--config`.

    python train_sft.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset data/chat.jsonl --output_dir runs/trl-sft --max_steps 2000 --save_steps 200

The data set is a hub name or a local JSON Lines file with one conversation per
line: {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
(or a "text" column, or "prompt"/"completion" columns: TRL accepts all three).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import load_dataset  # type: ignore[import-untyped]
from trl import (  # type: ignore[attr-defined]
    ModelConfig,
    SFTConfig,
    SFTTrainer,
    TrlParser,
    get_peft_config,
)


@dataclass
class DataArguments:
    dataset: str = field(metadata={"help": "a hub data set name, or a .json/.jsonl file"})
    dataset_split: str = field(default="train", metadata={"help": "the split to train on"})


def load_train_split(args: DataArguments) -> object:
    if args.dataset.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=args.dataset, split=args.dataset_split)
    return load_dataset(args.dataset, split=args.dataset_split)


def main() -> None:
    parser = TrlParser((DataArguments, SFTConfig, ModelConfig))  # type: ignore[arg-type]
    data_args, training_args, model_args = parser.parse_args_and_config()
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=load_train_split(data_args),
        peft_config=get_peft_config(model_args),  # None unless --use_peft
    )
    # None on a fresh start; ftsup adds --resume_from_checkpoint <checkpoint> when resuming.
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
