"""The TUI's state model: merge rules and bounds, without a terminal."""

from __future__ import annotations

import json
from typing import Any

from ftsup.supervisor.health.gpu import gpu_entry, gpu_reading
from ftsup.tui.model import (
    EVENTS_MAX,
    LOG_MAX,
    SERIES_MAX,
    LogBuffer,
    Series,
    TuiState,
)
from tests.tui.conftest import RECORDING


def progress(step: int, loss: float | None = None, ts: float = 0.0, **more: Any) -> dict[str, Any]:
    return {"step": step, "max_steps": 100, "loss": loss, "last_update": ts, **more}


def event(
    kind: str, job: str | None = "a", id: int | None = None, ts: float = 0.0, **data: Any
) -> dict[str, Any]:
    return {"id": id, "ts": ts, "job": job, "kind": kind, "message": kind, "data": data}


def test_recorded_answers_replayed_give_the_same_state_as_the_daemon_said() -> None:
    recording = json.loads(RECORDING.read_text())
    state = TuiState()
    for item in recording["events"]:
        state.apply_event(item)
    status = next(a["result"] for a in recording["answers"] if a["request"] == {"type": "status"})
    state.apply_status_list(status)
    for job in status["jobs"]:
        model = state.jobs[job["name"]]
        assert model.state == job["state"]
        assert model.restarts == job["restarts"]
        assert model.step == job["progress"]["step"]
    assert state.counts() == {
        "running": 1,
        "waiting": 0,
        "failing": 1,
        "finished": 1,
        "stopped": 1,
    }


def test_a_late_status_answer_does_not_roll_progress_or_state_back() -> None:
    state = TuiState()
    state.apply_event(event("progress", ts=10, **progress(50, 0.5, ts=10)))
    state.apply_event(event("state", ts=10, state="stopping", reason="asked"))
    old = {"name": "a", "state": "running", "updated_at": 5, "progress": progress(40, 0.6, ts=5)}
    state.apply_status_list({"jobs": [old]})
    assert state.jobs["a"].step == 50
    assert state.jobs["a"].state == "stopping"


def test_a_resumed_run_rewinds_the_curve_without_the_stale_point() -> None:
    state = TuiState()
    for step in (10, 20, 30, 40):
        state.apply_event(event("progress", **progress(step, 10 / step, ts=step)))
    # Resumed from checkpoint-25: the first report carries the old loss.
    state.apply_event(event("progress", **progress(25, 10 / 40, ts=50)))
    state.apply_event(event("progress", **progress(27, 10 / 27, ts=51)))
    assert list(state.jobs["a"].loss) == [(10, 1.0), (20, 0.5), (27, 10 / 27)]


def test_eval_loss_is_plotted_where_it_changes_only() -> None:
    state = TuiState()
    for step, eval_loss in ((1, None), (2, 0.9), (3, 0.9), (4, 0.9), (5, 0.7)):
        state.apply_event(event("progress", **progress(step, 1.0, ts=step, eval_loss=eval_loss)))
    assert list(state.jobs["a"].eval_loss) == [(2, 0.9), (5, 0.7)]


def test_everything_kept_is_bounded() -> None:
    series = Series()
    for x in range(SERIES_MAX * 3):
        series.add(x, float(x))
    assert len(series) == SERIES_MAX
    log = LogBuffer()
    log.append(f"line {i}" for i in range(LOG_MAX * 2))
    assert len(log.lines) == LOG_MAX and log.seq == LOG_MAX * 2
    assert log.newer_than(0) is None  # fell out: the view must reload
    assert log.newer_than(log.seq - 3) == [f"line {i}" for i in range(LOG_MAX * 2 - 3, LOG_MAX * 2)]
    state = TuiState()
    for i in range(EVENTS_MAX * 2):
        state.apply_event(event("warning", id=i + 1))
    assert len(state.jobs["a"].events) == EVENTS_MAX and len(state.timeline) == EVENTS_MAX


def test_durable_events_are_deduplicated_and_kept_in_id_order() -> None:
    state = TuiState()
    state.apply_event(event("restart", id=5))
    state.apply_event(event("attempt_exited", id=4))  # a late history answer
    change = state.apply_history([event("restart", id=5), event("submitted", id=1)])
    assert [e["id"] for e in state.jobs["a"].events] == [1, 4, 5]
    assert change.events == {"", "a"}
    assert state.last_event_id == 5


def test_the_log_tail_and_lines_streamed_meanwhile_are_not_doubled() -> None:
    log = LogBuffer()
    log.replace(["a", "b", "c"], attempt=1, since=["b", "c", "d"])
    assert list(log.lines) == ["a", "b", "c", "d"]
    log.append(["x"], attempt=2)
    assert list(log.lines)[-2:] == ["──── attempt 2 ────", "x"]


def test_checkpoints_from_events_until_the_daemon_answers_checkpoints() -> None:
    state = TuiState()
    for step in (10, 20, 30):
        state.apply_event(
            event(
                "checkpoint",
                id=step,
                path=f"/o/checkpoint-{step}",
                step=step,
                valid=True,
                resumable=True,
                size_bytes=1,
                mtime=step,
            )
        )
    state.apply_event(event("retention", id=31, deleted=["/o/checkpoint-10"]))
    rows, note = state.jobs["a"].checkpoint_rows()
    assert rows is not None and [r["step"] for r in rows] == [30, 20]
    assert note is not None and "events" in note
    state.apply_checkpoints("a", {"checkpoints": [{"path": "/o/checkpoint-30", "step": 30}]})
    rows, note = state.jobs["a"].checkpoint_rows()
    assert rows == [{"path": "/o/checkpoint-30", "step": 30}] and note is None


def test_gpu_answers_and_samples() -> None:
    recording = json.loads(RECORDING.read_text())
    answer = next(a["result"] for a in recording["answers"] if a["request"] == {"type": "gpus"})
    state = TuiState()
    state.gpus.apply(answer, sample=False)
    assert state.gpus.available and [g["index"] for g in state.gpus.gpus] == [0, 1]
    assert list(state.gpus.series[0]["util"]) == answer["gpus"][0]["series"]["util"]
    state.gpus.apply({"index": 0, "util": 12, "mem_used": 1, "mem_total": 2}, sample=True)
    assert state.gpus.series[0]["util"][-1] == 12 and state.gpus.gpus[0]["util"] == 12
    state.gpus.apply(
        {"status": "GPU monitor off: no NVML", "active": False, "gpus": []}, sample=False
    )
    assert not state.gpus.available and state.gpus.status == "GPU monitor off: no NVML"


def test_lagged_asks_for_a_resync_and_summary_events_for_a_refetch() -> None:
    state = TuiState()
    assert state.apply_event({"kind": "lagged", "job": None, "data": {"dropped": 3}}).resync
    assert state.apply_event(event("attempt_exited", id=1)).refetch
    assert not state.apply_event(event("log", lines=["x"])).refetch


def test_quarantined_checkpoints_are_listed_as_invalid() -> None:
    state = TuiState()
    answer = {
        "checkpoints": [
            {
                "path": "/o/checkpoint-20",
                "step": 20,
                "valid": True,
                "resumable": True,
                "resume_candidate": True,
            }
        ],
        "quarantined": ["/o/checkpoint-30.invalid-missing-rng-state"],
    }
    state.apply_checkpoints("a", answer)
    rows, _ = state.jobs["a"].checkpoint_rows()
    assert rows is not None and [(r["step"], r["valid"]) for r in rows] == [(30, False), (20, True)]
    assert rows[0]["reason"] == "quarantined (missing-rng-state)"


def test_quarantined_entries_of_the_listing_show_their_recorded_reason() -> None:
    """The listing (docs/checkpoints.md) gives each quarantined folder its step and
    the full reason from its note; the TUI shows that, not the shortened slug."""
    state = TuiState()
    folder = "/o/checkpoint-30.invalid-rng-state-pth-is-missing"
    answer = {
        "output_dir": "/o",
        "checkpoints": [],
        "resume_from": None,
        "quarantined": [{"path": folder, "step": 30, "reason": "rng_state.pth is missing"}],
    }
    state.apply_checkpoints("a", answer)
    rows, _ = state.jobs["a"].checkpoint_rows()
    assert rows is not None and [(r["step"], r["path"], r["valid"]) for r in rows] == [
        (30, folder, False)
    ]
    assert rows[0]["reason"] == "quarantined (rng_state.pth is missing)"


def test_a_gpu_reading_in_the_one_shape_is_shown() -> None:
    """`available` (the shape `ftsup gpus --json` and the daemon share) decides."""
    sample = {"t": 1.0, "util_gpu": 50, "mem_used": 1, "mem_total": 4, "temp_c": 60}
    reading = gpu_reading(
        available=True,
        status="GPU monitor on: 1 GPU",
        reason=None,
        driver="550.54.15",
        gpus=[gpu_entry({"index": 0, "name": "NVIDIA H100"}, [sample], None)],
    )
    state = TuiState()
    state.gpus.apply(reading, sample=False)
    assert state.gpus.available and state.gpus.gpus[0]["temp"] == 60
    assert list(state.gpus.series[0]["util"]) == [50.0]
    off = gpu_reading(
        available=False, status="GPU monitor off: x", reason="x", driver=None, gpus=[]
    )
    state.gpus.apply(off, sample=False)
    assert not state.gpus.available and state.gpus.status == "GPU monitor off: x"
