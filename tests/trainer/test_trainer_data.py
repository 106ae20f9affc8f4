"""Reading, normalising and tokenising data: formats, masking, cutoff, eval split."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from ftsup.trainer.data import (
    IGNORE_INDEX,
    DataError,
    encode,
    encode_all,
    load_conversations,
    split_eval,
)
from ftsup.trainer.tiny import arithmetic_rows, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


def trained_text(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    kept = [tok for tok, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    return str(tokenizer.decode(kept))


def test_alpaca_jsonl_json_and_csv_agree(tmp_path: Path) -> None:
    rows = [{"instruction": "What is 1+2?", "input": "", "output": "3"}]
    (tmp_path / "a.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with (tmp_path / "a.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    loaded = [load_conversations([tmp_path / f"a.{ext}"]) for ext in ("jsonl", "json", "csv")]
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][0] == [
        {"role": "user", "content": "What is 1+2?"},
        {"role": "assistant", "content": "3"},
    ]


def test_alpaca_input_and_system(tmp_path: Path) -> None:
    row = {"instruction": "Translate", "input": "hallo", "output": "hello", "system": "Be terse"}
    (tmp_path / "a.jsonl").write_text(json.dumps(row))
    [messages] = load_conversations([tmp_path / "a.jsonl"], "alpaca")
    assert messages[0] == {"role": "system", "content": "Be terse"}
    assert messages[1]["content"] == "Translate\nhallo"


def test_chat_and_sharegpt_rows(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps(share) + "\n")
    first, second = load_conversations([tmp_path / "c.jsonl"])
    assert first == second


def test_only_replies_are_trained_with_chat_template(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    example = encode(tokenizer, messages, cutoff_len=512)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == full
    assert trained_text(tokenizer, example.input_ids, example.labels) == "4</s>6</s>"


def test_plain_template_without_chat_template(tokenizer: Any) -> None:
    plain = build_tiny_tokenizer()
    plain.chat_template = None  # type: ignore[attr-defined]
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    example = encode(plain, messages, cutoff_len=512)
    text = plain.decode(example.input_ids)  # type: ignore[attr-defined]
    assert "### Instruction:\nQ" in text and "### Response:\nA</s>" in text
    assert trained_text(plain, example.input_ids, example.labels) == "A</s>"


def test_cutoff_drops_rows_without_a_reply(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}]
    example = encode(tokenizer, messages, cutoff_len=10)
    assert len(example.input_ids) == 10
    with pytest.raises(DataError, match="cutoff_len"):
        encode_all(tokenizer, [messages], cutoff_len=10)


def test_eval_split_is_deterministic_and_disjoint() -> None:
    items = list(range(100))
    train, evals = split_eval(items, 0.1, seed=3)
    assert len(evals) == 10 and not set(train) & set(evals)
    assert split_eval(items, 0.1, seed=3) == (train, evals)
    assert len(split_eval(items, 5.0, seed=3)[1]) == 5
    with pytest.raises(DataError, match="val_size"):
        split_eval(items, 100.0, seed=3)


def test_arithmetic_rows_are_reproducible() -> None:
    assert arithmetic_rows(20, seed=1) == arithmetic_rows(20, seed=1)
    for row in arithmetic_rows(50, seed=2):
        question = row["instruction"].removeprefix("What is ").removesuffix("?")
        left, op, right = question.partition("+") if "+" in question else question.partition("-")
        expected = int(left) + int(right) if op == "+" else int(left) - int(right)
        assert row["output"] == str(expected) and expected >= 0


def test_json_that_is_not_a_list(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text('{"instruction": "a"}')
    with pytest.raises(DataError, match="list of rows"):
        load_conversations([tmp_path / "d.json"])


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl: line 2"):
        load_conversations([tmp_path / "d.jsonl"])
