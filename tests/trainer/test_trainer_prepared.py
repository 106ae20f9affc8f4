"""Data tokenized ahead (by a warm standby) is reused only while nothing it was
built from has changed: the data files, the tokenizer, the settings that shape it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ftsup.trainer.config import train_section_from_dict
from ftsup.trainer.prepared import prepare_data, reuse_or_prepare


def test_prepared_data_is_reused_until_an_input_changes(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "What is 1+1?", "output": "2"}\n' * 6)
    train = train_section_from_dict(
        {"model": str(tiny_model), "dataset": [str(data)], "cutoff_len": 32, "max_steps": 4}
    )
    prepared = prepare_data(train)
    assert len(prepared.train_set) == 6
    assert reuse_or_prepare(train, prepared) is prepared

    for changed in ({"cutoff_len": 48}, {"seed": 5}, {"val_size": 1.0}):
        assert reuse_or_prepare(dataclasses.replace(train, **changed), prepared) is not prepared

    data.write_text('{"instruction": "What is 2+2?", "output": "4"}\n' * 3)
    os.utime(data, ns=(1, prepared_mtime(prepared) + 1))  # even with a coarse clock
    rebuilt = reuse_or_prepare(train, prepared)
    assert rebuilt is not prepared and len(rebuilt.train_set) == 3

    tokenizer_file = next(tiny_model.glob("tokenizer*"))
    os.utime(tokenizer_file, ns=(1, tokenizer_file.stat().st_mtime_ns + 1))
    assert reuse_or_prepare(train, rebuilt) is not rebuilt


def prepared_mtime(prepared: object) -> int:
    stamps = prepared.key[-1]  # type: ignore[attr-defined]
    return int(stamps[0][2])
