"""The post-resume loss check."""

from __future__ import annotations

from ftsup.supervisor.checkpoints.postresume import loss_jump


def test_small_changes_pass() -> None:
    assert loss_jump([2.0, 2.1, 1.9], [2.05, 1.95]) is None


def test_a_jump_is_named() -> None:
    warning = loss_jump([2.0, 2.0, 2.0], [3.0, 3.0])
    assert warning is not None and "+50%" in warning and "threshold 20%" in warning
    assert loss_jump([2.0], [1.0]) is not None  # a drop is suspicious too
    assert loss_jump([2.0], [2.3], threshold=0.1) is not None


def test_too_little_data_or_nan() -> None:
    assert loss_jump([], [1.0]) is None
    assert loss_jump([1.0], []) is None
    assert loss_jump([float("nan")], [5.0]) is None
    assert loss_jump([0.0], [5.0]) is None


def test_only_the_window_counts() -> None:
    before = [10.0] * 10 + [2.0] * 5
    assert loss_jump(before, [2.1, 2.0, 1.9, 50.0, 50.0, 50.0], window=3) is None
