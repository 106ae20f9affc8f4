"""The `ftsup demo` building blocks: a deterministic offline job, and the answers at the end.

`prepare_demo` writes a tiny Llama model, its tokenizer, single-digit
arithmetic data and a `job.toml` (a LoRA run with several checkpoints) into a
folder; the `ftsup demo` command submits that job, crashes it once midway
(`demo_fault_env`), and finally shows `sample_answers` from the newest
checkpoint. On 2 CPU cores the default run trains in about a minute (1200
steps, 8 checkpoints); the loss falls from about 4 to under 0.1 and the
model answers the sample questions correctly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import ENV_FAULT_AT_STEP, ENV_FAULT_ONCE_FILE
from ftsup.trainer.tiny import build_arithmetic_dataset, build_tiny_model

DEMO_STEPS = 1200
DEMO_PROMPTS = ("What is 2+3?", "What is 7+8?", "What is 9-4?", "What is 6+6?")
_MAX_OPERAND = 9  # single digits: a 128-wide model gets them all right in ~1000 steps


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def _toml_table(name: str, values: dict[str, object]) -> str:
    lines = [f"[{name}]"] + [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def demo_train_table(workdir: Path, *, steps: int = DEMO_STEPS, seed: int = 0) -> dict[str, Any]:
    """The `[train]` table of the demo job (absolute paths)."""
    return {
        "model": str(workdir / "model"),
        "dataset": [str(workdir / "data" / "arithmetic.jsonl")],
        "format": "alpaca",
        "finetuning_type": "lora",
        "lora_rank": 16,
        "cutoff_len": 64,
        "per_device_train_batch_size": 16,
        "learning_rate": 2e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 10,
        "max_steps": steps,
        "save_steps": max(1, steps // 8),
        "save_total_limit": 3,
        "logging_steps": 5,
        "seed": seed,
    }


def prepare_demo(
    workdir: Path, *, steps: int = DEMO_STEPS, seed: int = 0, name: str = "ftsup-demo"
) -> Path:
    """Build model, tokenizer, data and `job.toml` in `workdir`; returns the job file.

    Everything is derived from `seed`, so two calls give the same bytes (the
    job file differs only by the folder it names).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    build_tiny_model(workdir / "model", seed=seed, hidden=128, layers=4)
    build_arithmetic_dataset(
        workdir / "data" / "arithmetic.jsonl", 2000, seed + 1, max_operand=_MAX_OPERAND
    )
    job = _toml_table("job", {"name": name, "output_dir": str(workdir / "output")})
    train = _toml_table("train", demo_train_table(workdir, steps=steps, seed=seed))
    restart = _toml_table("restart", {"backoff": "2s", "max_restarts": 3})
    header = "# ftsup demo: LoRA on a tiny offline Llama model learning single-digit arithmetic.\n"
    path = workdir / "job.toml"
    path.write_text(header + "\n" + job + "\n" + train + "\n" + restart)
    return path


def demo_fault_env(workdir: Path, step: int) -> dict[str, str]:
    """Environment that makes the trainer SIGKILL itself once, at `step` (for the demo)."""
    return {
        ENV_FAULT_AT_STEP: str(step),
        ENV_FAULT_ONCE_FILE: str(Path(workdir).resolve() / "crashed-once"),
    }


def _load_for_generation(model_dir: Path, trained_dir: Path | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any
    if trained_dir is not None and (trained_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(model_dir))
        model = PeftModel.from_pretrained(base, str(trained_dir))
    else:  # a full fine-tuning checkpoint is a whole model; None means the base itself
        model = AutoModelForCausalLM.from_pretrained(str(trained_dir or model_dir))
    tokenizer_dir = (
        trained_dir if trained_dir and (trained_dir / "tokenizer.json").exists() else model_dir
    )
    return model.eval(), AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _prompt_text(tokenizer: Any, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    return f"{tokenizer.bos_token or ''}### Instruction:\n{prompt}\n\n### Response:\n"


def sample_answers(
    model_dir: Path,
    adapter_or_checkpoint_dir: Path | None,
    prompts: Sequence[str] = DEMO_PROMPTS,
    *,
    max_new_tokens: int = 16,
) -> list[tuple[str, str]]:
    """(prompt, greedy answer) pairs from the base model plus a LoRA checkpoint."""
    import torch

    trained = Path(adapter_or_checkpoint_dir) if adapter_or_checkpoint_dir else None
    model, tokenizer = _load_for_generation(Path(model_dir), trained)
    answers = []
    for prompt in prompts:
        inputs = tokenizer(
            _prompt_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt"
        )
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        reply = output[0, inputs["input_ids"].shape[1] :]
        answers.append((prompt, str(tokenizer.decode(reply, skip_special_tokens=True)).strip()))
    return answers
