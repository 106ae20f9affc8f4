"""The demo job's offline preparation is deterministic and a valid job file.

The demo run itself (a crash, the resume from the memory snapshot, the answers
it learned) is tested end to end under the daemon in tests/test_demo.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ftsup.supervisor.spec import load_spec
from ftsup.trainer.demo import prepare_demo


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_demo_is_deterministic_and_a_valid_job(tmp_path: Path) -> None:
    first = prepare_demo(tmp_path / "a", steps=40)
    second = prepare_demo(tmp_path / "b", steps=40)
    for name in ("model/model.safetensors", "model/tokenizer.json", "data/arithmetic.jsonl"):
        assert digest(first.parent / name) == digest(second.parent / name), name
    spec = load_spec(first)
    assert spec.train is not None and spec.train.max_steps == 40
    assert spec.train.save_steps is not None and 40 // spec.train.save_steps >= 4
    assert spec.output_dir == first.parent / "output"
    assert first.read_text().replace(str(first.parent), "") == second.read_text().replace(
        str(second.parent), ""
    )
