"""Following progress files: partial lines, replacement, rates since the last restart."""

from __future__ import annotations

import json
from pathlib import Path

from ftsup.supervisor.progress import JsonlFollower, ProgressState, records_from_trainer_state


def test_follower_keeps_a_partial_line_until_it_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    follower = JsonlFollower(path)
    assert follower.read_new() == []
    with path.open("a") as f:
        f.write('{"step": 1}\n{"step": 2')
    assert follower.read_new() == [{"step": 1}]
    with path.open("a") as f:
        f.write(', "loss": 0.5}\nnot json\n[1]\n')
    assert follower.read_new() == [{"step": 2, "loss": 0.5}]
    assert follower.read_new() == []


def test_follower_starts_over_when_the_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    follower = JsonlFollower(path)
    assert len(follower.read_new()) == 2
    path.unlink()
    path.write_text('{"step": 9}\n')
    assert follower.read_new() == [{"step": 9}]


def test_rate_and_eta_count_only_the_current_attempt() -> None:
    state = ProgressState()
    state.begin_attempt(now=0.0, start_step=0)
    for step in range(1, 11):
        state.apply({"ts": float(step), "event": "step", "step": step, "max_steps": 110})
    assert state.steps_per_s() == 1.0
    # Restart from step 5 after a long downtime: the gap must not drag the rate down.
    state.begin_attempt(now=1000.0, start_step=5)
    for i, step in enumerate(range(6, 16)):
        state.apply({"ts": 1000.0 + 0.5 * i, "event": "step", "step": step, "max_steps": 110})
    assert state.steps_per_s() == 2.0
    assert state.eta_s() == (110 - 15) / 2.0
    assert state.attempt_max_step == 15


def test_replayed_lines_of_earlier_attempts_do_not_count_as_progress() -> None:
    state = ProgressState()
    state.begin_attempt(now=100.0, start_step=10)
    state.apply({"ts": 50.0, "event": "step", "step": 30})  # from an earlier attempt
    assert state.attempt_max_step == 10
    state.apply({"ts": 101.0, "event": "step", "step": 11})
    assert state.attempt_max_step == 11


def test_trainer_state_log_history_becomes_progress(tmp_path: Path) -> None:
    state_file = tmp_path / "trainer_state.json"
    state_file.write_text(
        json.dumps(
            {
                "global_step": 20,
                "max_steps": 100,
                "log_history": [
                    {"step": 10, "loss": 2.0, "learning_rate": 1e-4, "epoch": 0.1},
                    {"step": 20, "loss": 1.5, "learning_rate": 9e-5, "epoch": 0.2},
                    {"step": 20, "eval_loss": 1.7},
                ],
            }
        )
    )
    state = ProgressState()
    for record in records_from_trainer_state(state_file):
        state.apply(record)
    assert (state.step, state.max_steps, state.loss, state.eval_loss) == (20, 100, 1.5, 1.7)
    assert state.lr == 9e-5 and state.last_checkpoint_step == 20
