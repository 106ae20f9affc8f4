"""A tiny Llama model, its tokenizer and an arithmetic data set, built offline.

The demo and the tests need a real Hugging Face model that trains in seconds on
a CPU and never touches the hub: a character-level tokenizer (so any text is
representable without training a vocabulary) and a randomly initialised
Llama-architecture model, both bit-for-bit reproducible from a seed.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any, cast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
# Printable ASCII plus newline: enough for prompts, numbers and code snippets.
CHARACTERS = tuple(dict.fromkeys("\n" + string.printable[:95]))

# Roles are special tokens, so rendering a conversation never depends on the data.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tiny_vocab() -> dict[str, int]:
    """Fixed vocabulary: special tokens first, then one id per character."""
    tokens = [*SPECIAL_TOKENS, *CHARACTERS]
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_tokenizer(out_dir: Path | None = None) -> object:
    """A `PreTrainedTokenizerFast` that splits text into single characters."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab()
    # BPE without merges is exactly a character tokenizer; Fuse joins on decode.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    tokenizer = cast(Any, PreTrainedTokenizerFast)(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 512,
) -> Path:
    """Write a random Llama model (safetensors) and its tokenizer to `out_dir`.

    The same arguments always give the same bytes: weights are drawn from a
    forked RNG seeded with `seed`, so the caller's random state is untouched.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # With the default init (std 0.02) and a final RMSNorm, a frozen output
        # layer caps every logit near 1: LoRA could never make a confident
        # prediction. Unit-variance logits leave it room, as a trained base has.
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, hidden**-0.5)
    model.generation_config.pad_token_id = vocab[PAD]
    model.save_pretrained(str(out_dir), safe_serialization=True)
    build_tiny_tokenizer(out_dir)
    return out_dir


def arithmetic_rows(n: int, seed: int, *, max_operand: int = 20) -> list[dict[str, str]]:
    """`n` alpaca rows of small additions and subtractions (answers never negative)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if rng.random() < 0.5:
            question, answer = f"{a}+{b}", a + b
        else:
            a, b = max(a, b), min(a, b)
            question, answer = f"{a}-{b}", a - b
        rows.append({"instruction": f"What is {question}?", "input": "", "output": str(answer)})
    return rows


def build_arithmetic_dataset(path: Path, n: int, seed: int, *, max_operand: int = 20) -> Path:
    """Write `n` arithmetic rows as alpaca JSONL; a tiny model visibly learns the task."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = arithmetic_rows(n, seed, max_operand=max_operand)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
