"""Drift guard and elastic jobs: a resize that keeps the global batch is exact.

An elastic job that loses (or gets back) GPUs changes its world size and its
accumulation together so that per-device batch x accumulation x world size,
the global batch, stays the same. The guard must accept exactly that change,
and nothing that merely looks like it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ftsup.supervisor.checkpoints.drift_guard import (
    diff_fingerprints,
    drift_refused,
    elastic_resize,
    elastic_summary,
    make_fingerprint,
)
from ftsup.supervisor.fingerprint import elastic_accumulation, train_fingerprint
from ftsup.supervisor.spec_types import TrainSection


def _fp(world_size: int, accumulation: int, **changes: object) -> dict[str, object]:
    base = make_fingerprint(
        model="m",
        dataset=["a.jsonl"],
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        world_size=world_size,
        cutoff_len=512,
        seed=1,
        global_batch=16,
    )
    base.update(changes)
    return base


def test_shrinking_with_the_same_global_batch_is_reported_not_refused() -> None:
    drifts = diff_fingerprints(_fp(2, 4), _fp(1, 8))
    assert not drift_refused(drifts)
    assert [(d.key, d.elastic) for d in drifts] == [
        ("gradient_accumulation_steps", True),
        ("world_size", True),
    ]
    assert drifts[1].message == (
        "world size changed from 2 to 1 (elastic: the global batch is kept, "
        "the data order is unchanged)"
    )
    assert elastic_resize(_fp(2, 4), _fp(1, 8)) == (2, 1)
    assert elastic_summary(_fp(2, 4), _fp(1, 8)) == (
        "world size 2 -> 1, accumulation 4 -> 8, global batch 16 kept"
    )


def test_growing_back_is_the_same_kind_of_change() -> None:
    assert elastic_resize(_fp(1, 8), _fp(2, 4)) == (1, 2)
    assert not drift_refused(diff_fingerprints(_fp(1, 8), _fp(2, 4)))


def test_no_resize_without_a_change_of_world_size() -> None:
    assert elastic_resize(_fp(2, 4), _fp(2, 4)) is None
    assert elastic_summary(_fp(2, 4), _fp(2, 4)) is None
    assert diff_fingerprints(_fp(2, 4), _fp(2, 4)) == []


def test_a_changed_global_batch_is_refused() -> None:
    drifts = diff_fingerprints(_fp(2, 4), _fp(1, 4, global_batch=8))
    assert drift_refused(drifts)
    assert elastic_resize(_fp(2, 4), _fp(1, 4, global_batch=8)) is None
    assert {d.key: d.refused for d in drifts} == {
        "world_size": True,
        "global_batch": True,
    }
    assert "global batch changed from 16 to 8: changes the data order" in drifts[1].message


def test_a_non_elastic_side_makes_a_world_size_change_refused() -> None:
    """A checkpoint without `global_batch` (not an elastic job) proves nothing."""
    old = _fp(2, 4)
    del old["global_batch"]
    assert elastic_resize(old, _fp(1, 8)) is None
    assert drift_refused(diff_fingerprints(old, _fp(1, 8)))


def test_a_changed_per_device_batch_is_refused_even_with_the_same_global_batch() -> None:
    new = _fp(1, 16, per_device_train_batch_size=1)
    drifts = diff_fingerprints(_fp(2, 4), new)
    assert elastic_resize(_fp(2, 4), new) is None
    assert drift_refused(drifts) and all(d.refused for d in drifts)


def test_an_inconsistent_fingerprint_is_not_a_resize() -> None:
    """2 x 4 x 1 is not 16: whatever wrote this did not keep the global batch."""
    assert elastic_resize(_fp(2, 4), _fp(1, 4)) is None
    assert drift_refused(diff_fingerprints(_fp(2, 4), _fp(1, 4)))


def test_other_changes_next_to_a_resize_are_still_refused() -> None:
    drifts = diff_fingerprints(_fp(2, 4), _fp(1, 8, dataset=["b.jsonl"]))
    assert drift_refused(drifts)
    assert [(d.key, d.refused) for d in drifts] == [
        ("dataset", True),
        ("gradient_accumulation_steps", False),
        ("world_size", False),
    ]


def test_train_fingerprint_records_the_elastic_accumulation(tmp_path: Path) -> None:
    data = tmp_path / "a.jsonl"
    data.write_text("{}\n")
    train = TrainSection(
        model="m",
        dataset=(str(data),),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
    )
    plain = train_fingerprint(train, 2)
    assert "global_batch" not in plain and plain["gradient_accumulation_steps"] == 4
    one = train_fingerprint(train, 1, global_batch=16)
    assert (one["world_size"], one["gradient_accumulation_steps"], one["global_batch"]) == (
        1,
        8,
        16,
    )
    assert elastic_summary(train_fingerprint(train, 2, global_batch=16), one) == (
        "world size 2 -> 1, accumulation 4 -> 8, global batch 16 kept"
    )
    with pytest.raises(ValueError, match="elastic global batch 16"):
        train_fingerprint(train, 3, global_batch=16)


def test_elastic_accumulation() -> None:
    assert elastic_accumulation(16, 2, 2) == 4
    assert elastic_accumulation(16, 2, 8) == 1
    for bad in ((16, 2, 16), (16, 3, 1), (0, 2, 1)):
        with pytest.raises(ValueError):
            elastic_accumulation(*bad)
