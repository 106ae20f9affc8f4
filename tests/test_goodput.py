"""Goodput accounting adds up, attributes recomputed steps and stalls, and advises."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from ftsup.supervisor.goodput import GoodputTracker, checkpoint_advice, young_daly_interval
from tests.supervisor_harness import Harness


def _steps(tracker: GoodputTracker, start_ts: float, steps: range, dt: float) -> float:
    ts = start_ts
    for step in steps:
        tracker.feed({"ts": ts, "event": "step", "step": step})
        ts += dt
    return ts - dt


def test_crash_and_resume_split_into_productive_recomputed_and_downtime() -> None:
    tracker = GoodputTracker()
    tracker.set_attempt_starts([0.0, 100.0])
    # Attempt 1: starts at 0, first step at 10, steps 1..20 one second apart, dies at 35.
    last = _steps(tracker, 10.0, range(1, 21), 1.0)
    assert last == 29.0
    # Attempt 2 (started at 100) resumes from step 15: steps 16..20 are recomputed.
    _steps(tracker, 110.0, range(16, 31), 1.0)
    report = tracker.report(0.0, 124.0)
    assert report.productive_s == 19.0 + 10.0  # 1->20 and 20->30
    assert report.recomputed_s == 4.0  # 16->20
    assert report.checkpoint_stall_s == 0.0
    assert math.isclose(report.restart_downtime_s, 124.0 - 33.0)
    assert math.isclose(report.ratio or 0, 29.0 / 124.0)


def test_checkpoint_stall_is_cut_out_of_the_step_interval() -> None:
    tracker = GoodputTracker()
    tracker.set_attempt_starts([0.0])
    tracker.feed({"ts": 1.0, "event": "step", "step": 1})
    tracker.feed({"ts": 1.1, "event": "checkpoint_start", "step": 1})
    tracker.feed({"ts": 3.1, "event": "checkpoint_saved", "step": 1})
    tracker.feed({"ts": 4.0, "event": "step", "step": 2})
    tracker.feed({"ts": 4.5, "event": "checkpoint_saved", "step": 2, "stall_s": 0.2})
    tracker.feed({"ts": 5.5, "event": "step", "step": 3})
    report = tracker.report(0.0, 6.0)
    assert math.isclose(report.checkpoint_stall_s, 2.2)
    assert math.isclose(report.productive_s, 3.0 + 1.5 - 2.2)


def test_an_async_save_reporting_later_moves_its_stall_out_of_training() -> None:
    tracker = GoodputTracker()
    tracker.set_attempt_starts([0.0])
    tracker.feed({"ts": 1.0, "event": "step", "step": 1})
    tracker.feed({"ts": 1.0, "event": "checkpoint_start", "step": 1})
    tracker.feed({"ts": 2.5, "event": "step", "step": 2})  # blocked 0.4 s by the snapshot
    tracker.feed({"ts": 3.5, "event": "step", "step": 3})
    tracker.feed({"ts": 3.9, "event": "checkpoint_saved", "step": 1, "stall_s": 0.4})
    tracker.feed({"ts": 4.5, "event": "step", "step": 4})
    report = tracker.report(0.0, 5.0)
    assert math.isclose(report.checkpoint_stall_s, 0.4)
    assert math.isclose(report.productive_s, 3.5 - 0.4)


records = st.lists(
    st.tuples(
        st.floats(0, 1000),
        st.sampled_from(["step", "checkpoint_start", "checkpoint_saved"]),
        st.integers(0, 500),
    ),
    max_size=200,
)


@given(records, st.lists(st.floats(0, 1000), max_size=5))
def test_the_parts_always_add_up_to_the_wall_time(
    feed: list[tuple[float, str, int]], starts: list[float]
) -> None:
    tracker = GoodputTracker()
    tracker.set_attempt_starts(starts)
    for ts, event, step in sorted(feed):
        tracker.feed({"ts": ts, "event": event, "step": step})
    report = tracker.report(0.0, 1000.0)
    parts = (
        report.productive_s
        + report.checkpoint_stall_s
        + report.recomputed_s
        + report.restart_downtime_s
    )
    assert math.isclose(parts, report.wall_s, rel_tol=1e-9, abs_tol=1e-6)
    assert (
        min(
            report.productive_s,
            report.checkpoint_stall_s,
            report.recomputed_s,
            report.restart_downtime_s,
        )
        >= 0
    )


def test_young_daly_advice() -> None:
    assert young_daly_interval(8.0, 3600.0) == math.sqrt(2 * 8 * 3600)
    tracker = GoodputTracker()
    tracker.set_attempt_starts([0.0])
    for step in range(1, 40):
        tracker.feed({"ts": float(step), "event": "step", "step": step})
        if step % 10 == 0:
            tracker.feed(
                {"ts": step + 0.1, "event": "checkpoint_saved", "step": step, "stall_s": 2.0}
            )
    advice = checkpoint_advice(tracker, wall_s=7200.0, failures=2, configured_steps=10)
    assert advice is not None
    assert math.isclose(advice["recommended_interval_s"], math.sqrt(2 * 2.0 * 3600.0))
    assert advice["recommended_steps"] == 120  # 1 s steps
    assert checkpoint_advice(tracker, wall_s=7200.0, failures=0, configured_steps=10) is None


def test_status_of_a_crashed_and_resumed_job_shows_goodput_that_adds_up(daemon: Harness) -> None:
    job = daemon.toy_job(
        "good", "--max-steps", "30", "--save-steps", "5", "--crash-at", "17", "--step-time", "0.05"
    )
    daemon.cli("start", str(job))
    status = daemon.wait_state("good", "finished", "gave_up", "failed")
    goodput = status["goodput"]
    parts = sum(
        goodput[k]
        for k in ("productive_s", "checkpoint_stall_s", "recomputed_s", "restart_downtime_s")
    )
    assert math.isclose(parts, goodput["wall_s"], rel_tol=1e-9)
    assert goodput["recomputed_s"] > 0  # steps 16-17 ran twice
    assert 0 < goodput["goodput"] < 1
    assert "goodput" in daemon.cli("status", "good").stdout


def test_steps_without_times_make_goodput_unknown_never_zero() -> None:
    tracker = GoodputTracker()
    tracker.set_attempt_starts([0.0])
    # What trainer_state.json gives: steps without times, a save with its file's mtime.
    for step in range(1, 11):
        tracker.feed({"event": "step", "step": step, "loss": 1.0})
    tracker.feed({"event": "checkpoint_saved", "step": 10, "ts": 30.0})
    report = tracker.report(0.0, 35.0)
    assert report.ratio is None and report.unknown is not None
    assert report.to_json() == {
        "wall_s": 35.0,
        "productive_s": None,
        "checkpoint_stall_s": None,
        "recomputed_s": None,
        "restart_downtime_s": None,
        "memory_stall_s": None,
        "memory_resumes": 0,
        "goodput": None,
        "unknown": report.unknown,
    }


def test_a_source_that_may_give_no_times_is_unknown_until_a_timed_step() -> None:
    tracker = GoodputTracker()
    tracker.untimed_source = "no timed step seen yet"
    tracker.set_attempt_starts([0.0])
    assert tracker.report(0.0, 10.0).to_json()["unknown"] == "no timed step seen yet"
    _steps(tracker, 10.0, range(1, 11), 1.0)
    report = tracker.report(0.0, 20.0)
    assert report.unknown is None and report.to_json()["unknown"] is None
    assert report.productive_s == 9.0 and report.ratio == 9.0 / 20.0


def test_a_job_that_reports_times_keeps_its_start_up_as_downtime() -> None:
    tracker = GoodputTracker()  # the built-in trainer: no step yet is 0%, not unknown
    tracker.set_attempt_starts([0.0])
    report = tracker.report(0.0, 10.0)
    assert report.unknown is None and report.ratio == 0.0


def test_a_memory_snapshots_stall_is_checkpoint_stall_and_counted_apart() -> None:
    """A snapshot is reported after training went on; its capture sat inside a
    step interval, which must not count as training."""
    tracker = GoodputTracker()
    tracker.set_attempt_starts([0.0])
    for step in range(1, 5):
        tracker.feed({"event": "step", "step": step, "ts": float(step)})
        tracker.feed({"event": "memory_snapshot", "step": step, "ts": step + 0.5, "stall_s": 0.1})
    tracker.feed({"event": "train_start", "step": 4, "ts": 6.0, "resumed_from_memory": True})
    report = tracker.report(0.0, 5.0)
    # 3 intervals of 1 s; 4 stalls of 0.1 s (the last one after the last interval)
    assert math.isclose(report.memory_stall_s, 0.4)
    assert math.isclose(report.checkpoint_stall_s, 0.4)
    assert math.isclose(report.productive_s, 2.6)
    assert report.memory_resumes == 1
