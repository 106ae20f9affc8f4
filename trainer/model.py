"""Load the base model and tokenizer, then make it trainable (LoRA, QLoRA or full).

The adapter's initial weights come from the seeded global RNG, so the same
seed gives the same starting point in every attempt; on resume they are
replaced by the checkpoint's weights anyway.
"""

from __future__ import annotations

from typing import Any, cast

from ftsup.supervisor.spec_types import TrainSection


def load_tokenizer(train: TrainSection) -> Any:
    """The tokenizer (default: the model's), with a pad token so batches can be padded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(train.tokenizer or train.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _dtype(train: TrainSection) -> Any:
    import torch

    if train.bf16:
        return torch.bfloat16
    if train.fp16:
        return torch.float16
    return torch.float32


def load_model(train: TrainSection) -> Any:
    """The model ready for training: a peft model for lora/qlora, the base for full."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _dtype(train)}
    if train.finetuning_type == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = cast(Any, BitsAndBytesConfig)(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if train.bf16 else torch.float16,
        )
        kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_compute_dtype
    model = AutoModelForCausalLM.from_pretrained(train.model, **kwargs)
    model.config.use_cache = False
    if train.finetuning_type == "full":
        return model
    if train.finetuning_type == "qlora":
        from peft import prepare_model_for_kbit_training

        model = cast(Any, prepare_model_for_kbit_training)(model)
    return add_lora(model, train)


def add_lora(model: Any, train: TrainSection) -> Any:
    """Wrap `model` with a LoRA adapter as configured in `[train]`."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = (
        "all-linear" if tuple(train.lora_target) == ("all",) else list(train.lora_target)
    )
    config = LoraConfig(
        r=train.lora_rank,
        lora_alpha=train.lora_alpha or 2 * train.lora_rank,
        lora_dropout=train.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
