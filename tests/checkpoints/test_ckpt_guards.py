"""Disk guard and drift guard."""

from __future__ import annotations

from pathlib import Path

from ftsup.supervisor.checkpoints.discovery import validate_all
from ftsup.supervisor.checkpoints.guards import (
    check_disk,
    compare_fingerprints,
    diff_fingerprints,
    disk_verdict,
    drift_refused,
    free_bytes,
    last_checkpoint_bytes,
    make_fingerprint,
)

GIB = 1024**3


def test_disk_auto_thresholds() -> None:
    assert disk_verdict(100 * GIB, 10 * GIB).level == "ok"
    warn = disk_verdict(15 * GIB, 10 * GIB)
    assert warn.level == "warn"
    assert (
        warn.reason
        == "15.0 GiB free on the output filesystem, below 2x the last checkpoint (20.0 GiB)"
    )
    pause = disk_verdict(10 * GIB, 10 * GIB)
    assert pause.level == "pause"
    assert pause.reason is not None and "pausing before a save fails (ENOSPC)" in pause.reason


def test_disk_explicit_thresholds() -> None:
    assert disk_verdict(5 * GIB, None, min_free=8 * GIB).level == "warn"
    assert disk_verdict(5 * GIB, None, min_free=8 * GIB, hard_floor=6 * GIB).level == "pause"
    assert disk_verdict(7 * GIB, None, min_free=8 * GIB, hard_floor=6 * GIB).level == "warn"
    # min_free below one checkpoint: the floor still pauses
    assert disk_verdict(9 * GIB, 10 * GIB, min_free=1 * GIB).level == "pause"


def test_no_checkpoint_yet_is_ok() -> None:
    verdict = disk_verdict(1, None)
    assert verdict.level == "ok" and verdict.reason is None


def test_free_bytes_of_a_real_filesystem(tmp_path: Path) -> None:
    assert free_bytes(tmp_path) > 0
    assert free_bytes(tmp_path / "not" / "yet") == free_bytes(tmp_path)
    assert check_disk(tmp_path, 1).level == "ok"


def test_guard_pauses_a_writer_before_it_runs_out_of_a_quota(
    pristine: dict[str, Path], tmp_path: Path
) -> None:
    """A size limit enforced in the test stands in for a tiny filesystem: the
    writer consults the guard before each save and pauses before ENOSPC."""
    checkpoint = next(r for r in validate_all(pristine["hf"]) if r.step == 6)
    size = checkpoint.size_bytes
    quota = size * 4 + size // 2  # room for four checkpoints and a half
    used, saves, verdicts = 0, 0, []
    while True:
        verdict = disk_verdict(quota - used, size if saves else None)
        verdicts.append(verdict.level)
        if verdict.level == "pause":
            break
        assert quota - used >= size, "the guard let a save run into ENOSPC"
        used += size
        saves += 1
    assert saves == 4
    assert verdicts == ["ok", "ok", "ok", "warn", "pause"]
    assert last_checkpoint_bytes(validate_all(pristine["hf"])) == size


def _fp(**changes: object) -> dict[str, object]:
    base = make_fingerprint(
        model="m",
        dataset=["a.jsonl"],
        per_device_train_batch_size=4,
        gradient_accumulation_steps=8,
        world_size=2,
        cutoff_len=512,
    )
    base.update(changes)
    return base


def test_no_drift() -> None:
    assert compare_fingerprints(_fp(), _fp()) == []
    assert compare_fingerprints(_fp(), _fp(dataset="a.jsonl")) == []  # one name or a list of one


def test_world_size_change_is_refused_with_its_effects() -> None:
    drifts = diff_fingerprints(_fp(), _fp(world_size=4))
    assert drift_refused(drifts)
    assert [d.message for d in drifts] == [
        "world size changed from 2 to 4: changes the data order and the optimizer state"
    ]


def test_every_refused_change_is_named() -> None:
    new = _fp(
        model="m2",
        dataset=["b.jsonl"],
        per_device_train_batch_size=2,
        gradient_accumulation_steps=16,
    )
    messages = compare_fingerprints(_fp(), new)
    assert messages == [
        "model changed from 'm' to 'm2': changes the data order and the optimizer state",
        "dataset changed from ['a.jsonl'] to ['b.jsonl']: changes the data order",
        "per-device batch size changed from 4 to 2: changes the data order and the optimizer state",
        "gradient accumulation changed from 8 to 16: changes the data order and the optimizer "
        "state",
    ]


def test_sequence_length_and_unknown_keys_are_reported_not_refused() -> None:
    drifts = diff_fingerprints(_fp(lr=1.0), {**_fp(lr=2.0), "max_seq_length": 1024})
    assert not drift_refused(drifts)
    assert [d.message for d in drifts] == [
        "sequence length changed from 512 to 1024 (does not change the data order or the "
        "optimizer state)",
        "lr changed from 1.0 to 2.0 (does not change the data order or the optimizer state)",
    ]


def test_missing_keys_are_not_compared() -> None:
    assert compare_fingerprints({"model": "m"}, _fp()) == []


def test_the_built_in_trainers_fingerprint_shape() -> None:
    """trainer/checkpointing.fingerprint: datasets as {path, size}, plus finetuning_type."""
    old = {"dataset": [{"path": "a.jsonl", "size": 10}], "finetuning_type": "lora", "seed": 1}
    grown = {"dataset": [{"path": "a.jsonl", "size": 12}], "finetuning_type": "full", "seed": 1}
    drifts = diff_fingerprints(old, grown)
    assert [d.key for d in drifts] == ["dataset", "finetuning_type"]
    assert all(d.refused for d in drifts)
    assert drifts[1].message == (
        "fine-tuning type changed from 'lora' to 'full': changes the optimizer state"
    )
