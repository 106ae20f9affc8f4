"""The run's tokenized data, built once and reusable while its inputs are unchanged.

Tokenizing a large data set takes seconds to minutes. A warm standby builds it
while it waits, so taking over a crashed run costs loading the checkpoint, not
tokenizing again; `reuse_or_prepare` rebuilds it when a data file, the
tokenizer's files, or a setting that shapes the data has changed meanwhile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.spec_types import TrainSection

FileStamp = tuple[str, int, int]  # path, size, mtime_ns


@dataclass(frozen=True)
class PreparedData:
    key: tuple[object, ...]  # what it was built from (`data_key`)
    tokenizer: Any
    train_set: Any
    eval_set: Any


def _stamps(paths: list[Path]) -> tuple[FileStamp, ...]:
    stamps = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            stamps.append((str(path), -1, -1))
            continue
        stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def _tokenizer_files(name: str) -> list[Path]:
    """The files of a local tokenizer folder (a hub name has none to watch)."""
    folder = Path(name)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and "token" in p.name)


def data_key(train: TrainSection) -> tuple[object, ...]:
    """Everything the tokenized data depends on, files by size and modification time."""
    tokenizer = train.tokenizer or train.model
    files = [Path(p) for p in train.dataset] + _tokenizer_files(tokenizer)
    settings = (tokenizer, tuple(train.dataset), train.format, train.cutoff_len)
    return (*settings, train.val_size, train.seed, os.fspath(train.model), _stamps(files))


def prepare_data(train: TrainSection) -> PreparedData:
    """Read, check, split and tokenize the data set (raises DataError on bad rows)."""
    from ftsup.trainer.batching import ExampleDataset
    from ftsup.trainer.data import encode_all, load_conversations, split_eval
    from ftsup.trainer.model import load_tokenizer

    key = data_key(train)
    conversations = load_conversations(train.dataset, train.format)
    train_rows, eval_rows = split_eval(conversations, train.val_size, train.seed)
    tokenizer = load_tokenizer(train)
    train_set = ExampleDataset(encode_all(tokenizer, train_rows, train.cutoff_len))
    eval_set = ExampleDataset(encode_all(tokenizer, eval_rows, train.cutoff_len))
    return PreparedData(key, tokenizer, train_set, eval_set)


def reuse_or_prepare(train: TrainSection, prepared: PreparedData | None) -> PreparedData:
    if prepared is not None and prepared.key == data_key(train):
        return prepared
    return prepare_data(train)
