"""Supervised fine-tuning data: read files, normalise rows, tokenise with masked prompts.

Reading and checking rows is stdlib only, so the supervisor can validate a
`[train]` table before it starts anything. Tokenising needs a tokenizer (and is
therefore only reached inside the trainer process). Every error names the file
and the row so that a user can fix the data without reading a traceback.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.spec import TRAIN_FORMATS

IGNORE_INDEX = -100
FORMATS = TRAIN_FORMATS  # one list, in supervisor/spec.py
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SHAREGPT_ROLES |= {"system": "system"}

Message = dict[str, str]


class DataError(ValueError):
    """Bad data or data settings; the message names the file, row or key and the fix."""


@dataclass(frozen=True)
class Example:
    """One tokenised conversation: labels are IGNORE_INDEX where the model must not learn."""

    input_ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------- reading files


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a .json (a list of objects), .jsonl or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist: fix the path in [train] dataset")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                rows = [dict(row) for row in csv.DictReader(handle)]
        else:
            raise DataError(
                f"dataset file {path}: unsupported extension {suffix!r}; use .json, .jsonl or .csv"
            )
    except UnicodeDecodeError as exc:
        raise DataError(f"dataset file {path} is not UTF-8 text: {exc}") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {index + 1} is not a JSON object")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json dataset must hold a list of rows (use .jsonl otherwise)")
    return data


# ------------------------------------------------------------ row normalisation


def detect_format(rows: Sequence[dict[str, Any]], path: Path) -> str:
    """`chat` for rows with `messages`/`conversations`, `alpaca` for `instruction`."""
    first = rows[0]
    if "messages" in first or "conversations" in first:
        return "chat"
    if "instruction" in first:
        return "alpaca"
    raise DataError(
        f"{path}: cannot tell the format from row 1 (keys: {sorted(first)}); rows need "
        "`instruction`/`output` (alpaca) or `messages` (chat), or set [train] format"
    )


def to_messages(row: dict[str, Any], fmt: str, where: str) -> list[Message]:
    """One row as a list of `{"role", "content"}` messages."""
    if fmt == "alpaca":
        return _alpaca_messages(row, where)
    return _chat_messages(row, where)


def _alpaca_messages(row: dict[str, Any], where: str) -> list[Message]:
    missing = [key for key in ("instruction", "output") if key not in row]
    if missing:
        raise DataError(
            f"{where}: missing {', '.join(repr(k) for k in missing)} "
            "(alpaca rows need `instruction` and `output`; `input` and `system` are optional)"
        )
    for key in ("instruction", "input", "output", "system"):
        if key in row and row[key] is not None and not isinstance(row[key], str):
            raise DataError(f"{where}: {key!r} must be a string")
    prompt = row["instruction"]
    if row.get("input"):
        prompt = f"{prompt}\n{row['input']}"
    messages: list[Message] = []
    if row.get("system"):
        messages.append({"role": "system", "content": row["system"]})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": row["output"]})
    return messages


def _chat_messages(row: dict[str, Any], where: str) -> list[Message]:
    raw = row.get("messages", row.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: chat rows need a non-empty `messages` list")
    messages: list[Message] = []
    for number, item in enumerate(raw, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{where}: message {number} is not an object")
        if "role" in item:
            role, content = item.get("role"), item.get("content")
        else:  # ShareGPT: {"from": "human", "value": "..."}
            role, content = _SHAREGPT_ROLES.get(str(item.get("from"))), item.get("value")
        if role not in ROLES:
            raise DataError(f"{where}: message {number} has role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {number} needs a string `content`")
        messages.append({"role": str(role), "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn from this row")
    return messages


def load_conversations(paths: Iterable[str | Path], fmt: str = "auto") -> list[list[Message]]:
    """Every row of every file, checked and normalised; raises DataError on the first bad row."""
    if fmt not in FORMATS:
        raise DataError(f"[train] format = {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    conversations: list[list[Message]] = []
    paths = list(paths)
    if not paths:
        raise DataError("[train] dataset is empty: name at least one data file")
    for path in map(Path, paths):
        rows = read_rows(path)
        if not rows:
            continue
        file_fmt = detect_format(rows, path) if fmt == "auto" else fmt
        for index, row in enumerate(rows):
            conversations.append(to_messages(row, file_fmt, f"{path}: row {index + 1}"))
    if not conversations:
        raise DataError(f"the data set is empty: no rows in {', '.join(map(str, paths))}")
    return conversations


def split_eval(items: Sequence[Any], val_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, eval): `val_size` < 1 is a fraction, >= 1 a whole row count; picked with `seed`.

    The accepted forms are `spec._val_size`'s (docs/trainer.md): 0, a fraction
    in (0, 1), or a whole count >= 1; a fraction keeps at least one eval row.
    """
    if val_size <= 0:
        return list(items), []
    count = int(val_size) if val_size >= 1 else max(1, round(len(items) * val_size))
    if count >= len(items):
        raise DataError(
            f"[train] val_size = {val_size} leaves no training rows ({len(items)} rows in total)"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[:count])
    train = [item for i, item in enumerate(items) if i not in eval_ids]
    return train, [items[i] for i in sorted(eval_ids)]


# ------------------------------------------------------------------ tokenising


def render_segments(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """The conversation as (text, trainable) pieces; assistant replies are trainable.

    With a chat template, each piece is the difference between successive
    renderings of the conversation, so the template decides every byte. Without
    one, a plain instruction template is used.
    """
    if getattr(tokenizer, "chat_template", None):
        segments = _template_segments(tokenizer, messages)
        if segments is not None:
            return segments
    return _plain_segments(tokenizer, messages)


def _render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )
    return str(text)


def _template_segments(
    tokenizer: Any, messages: Sequence[Message]
) -> list[tuple[str, bool]] | None:
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], True)
        full = _render(tokenizer, messages[: index + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            return None  # the template rewrites earlier turns: fall back
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return [(text, train) for text, train in segments if text]


def _plain_segments(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = [(tokenizer.bos_token or "", False)]
    for message in messages:
        if message["role"] == "system":
            segments.append((f"{message['content']}\n\n", False))
        elif message["role"] == "user":
            segments.append((f"### Instruction:\n{message['content']}\n\n### Response:\n", False))
        else:
            segments.append((f"{message['content']}{eos}", True))
            segments.append(("\n\n", False))
    return [(text, train) for text, train in segments if text]


def encode(tokenizer: Any, messages: Sequence[Message], cutoff_len: int) -> Example:
    """Token ids and labels (prompt masked), truncated to `cutoff_len` tokens."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trainable in render_segments(tokenizer, messages):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        input_ids += ids
        labels += ids if trainable else [IGNORE_INDEX] * len(ids)
    return Example(input_ids[:cutoff_len], labels[:cutoff_len])


def encode_all(
    tokenizer: Any, conversations: Sequence[Sequence[Message]], cutoff_len: int
) -> list[Example]:
    """Encode every conversation; drop those whose reply is cut off entirely."""
    examples = [encode(tokenizer, messages, cutoff_len) for messages in conversations]
    kept = [ex for ex in examples if any(label != IGNORE_INDEX for label in ex.labels)]
    if conversations and not kept:
        raise DataError(f"[train] cutoff_len = {cutoff_len} cuts off every reply: raise cutoff_len")
    return kept
