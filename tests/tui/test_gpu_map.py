"""The GPU map and queue without a daemon: which GPU reads held / free / out of use,
what an older daemon (no `queue`) still shows, how the queue and the waiting
jobs render, and which events make the app ask for the queue again."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from ftsup.supervisor.health.gpu import gpu_entry, gpu_reading
from ftsup.supervisor.protocol import STATE_STYLES, EventKind
from ftsup.tui.capture import screen_text
from ftsup.tui.model import JobModel, TuiState
from ftsup.tui.screens.dashboard import DashboardScreen
from ftsup.tui.widgets.connection_bar import bar_text
from ftsup.tui.widgets.gpu_map import map_rows, map_table
from ftsup.tui.widgets.jobs_table import job_cells
from ftsup.tui.widgets.queue_table import queue_table, wants_text
from tests.tui.conftest import recorded_app, until_synced

GIB = 2**30
QUEUE = {
    "holding": [{"job": "qwen-sft", "gpus": [0, 1]}],
    "waiting": [
        {
            "job": "eval-run",
            "position": 2,
            "priority": 0,
            "count": None,
            "devices": None,
            "after": ["tokenize"],
            "state": "blocked",
            "reason": "after tokenize, which failed",
        },
        {
            "job": "llama-sft",
            "position": 1,
            "priority": 10,
            "count": 2,
            "devices": None,
            "after": [],
            "state": "queued",
            "reason": "needs 2 GPUs: 0,1 used by qwen-sft, 3 unhealthy (XID 79: GPU has fallen "
            "off the bus)",
        },
    ],
}


def reading(unhealthy: dict[int, str] | None = None, count: int = 4) -> dict[str, Any]:
    """A `gpus` answer in the one shape the daemon and `ftsup gpus --json` share."""
    bad = unhealthy or {}
    sample = {"t": 1.0, "util_gpu": 40, "mem_used": 12 * GIB, "mem_total": 80 * GIB}
    return gpu_reading(
        available=True,
        status=f"GPU monitor on: {count} GPUs",
        reason=None,
        driver=None,
        gpus=[gpu_entry({"index": i, "name": "GPU"}, [sample], bad.get(i)) for i in range(count)],
    )


def state_with(queue: dict[str, Any] | None, gpus: dict[str, Any] | None = None) -> TuiState:
    state = TuiState()
    state.gpus.apply(gpus or reading({3: "XID 79: GPU has fallen off the bus"}), sample=False)
    state.apply_queue(queue, "this daemon has no `queue` request")
    return state


def rendered(renderable: Any, width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None, file=None)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get()


def test_each_gpu_reads_its_holder_free_or_out_of_use() -> None:
    state = state_with(QUEUE)
    rows = {row.index: row for row in map_rows(state.gpus, state.queue)}
    assert [rows[i].state for i in range(4)] == ["qwen-sft", "qwen-sft", "free", "–"]
    assert rows[3].healthy is False and rows[3].health.startswith("unhealthy: XID 79")
    assert (rows[0].mem_used, rows[0].mem_total) == (12 * GIB, 80 * GIB)
    text = rendered(map_table(list(rows.values())))
    assert "12/80 GiB" in text and "XID 79" in text
    assert "others" not in text  # no foreign-memory column when the daemon does not say


def test_an_older_daemon_still_gets_its_gpus_without_holders() -> None:
    state = state_with(None)
    rows = map_rows(state.gpus, state.queue)
    assert [row.index for row in rows] == [0, 1, 2, 3]
    assert {row.state for row in rows} == {"?"}  # unknown, not "free"
    assert not state.queue.known and "no `queue` request" in state.queue.note


def test_a_held_gpu_the_monitor_does_not_know_is_still_listed() -> None:
    """No NVML: the reading is off, but jobs that name GPUs hold them all the same."""
    off = gpu_reading(
        available=False, status="GPU monitor off: x", reason="x", driver=None, gpus=[]
    )
    state = state_with(QUEUE, off)
    rows = map_rows(state.gpus, state.queue)
    assert [(r.index, r.holder, r.healthy) for r in rows] == [
        (0, "qwen-sft", None),
        (1, "qwen-sft", None),
    ]


def test_foreign_memory_makes_an_unheld_gpu_busy_and_gets_a_column() -> None:
    state = state_with({**QUEUE, "foreign_mib": {"2": 3072, "1": 10}})
    rows = {row.index: row for row in map_rows(state.gpus, state.queue)}
    assert rows[2].state == "busy" and rows[2].foreign_mib == 3072
    assert rows[1].state == "qwen-sft"  # a holder stays the holder
    text = rendered(map_table(list(rows.values())))
    assert "others" in text and "3.0 GiB" in text
    # A daemon configured with a higher limit (daemon.toml) says so: then it is free.
    state.apply_queue({**QUEUE, "foreign_mib": {"2": 3072}, "foreign_limit_mib": 4096})
    assert map_rows(state.gpus, state.queue)[2].state == "free"


def test_the_queue_lists_waiting_jobs_in_position_order_with_the_full_reason() -> None:
    state = state_with(QUEUE)
    assert [w["job"] for w in state.queue.waiting] == ["llama-sft", "eval-run"]
    text = rendered(queue_table(state.queue.waiting), width=80)
    flat = " ".join(text.split())
    assert "1 llama-sft queued 10 2 GPUs" in flat and "2 eval-run blocked 0 no GPU" in flat
    assert "(XID 79: GPU has fallen off the bus)" in flat  # wrapped at 80, not cut
    assert wants_text({"devices": [0, 1]}) == "GPU 0,1"
    assert wants_text({"count": 1}) == "1 GPU"


def test_queued_and_blocked_jobs_have_their_colours_and_a_count() -> None:
    for state_name in ("queued", "blocked"):
        job = JobModel("j", state=state_name)
        cell = job_cells(job, 0.0)["state"]
        assert cell.plain == state_name
        assert cell.spans[0].style == STATE_STYLES[state_name] != ""
    state = TuiState()
    state.apply_status_list(
        {"jobs": [{"name": "a", "state": "queued"}, {"name": "b", "state": "running"}]}
    )
    counts = state.counts()
    assert counts["waiting"] == 1 and counts["running"] == 1
    assert "1 waiting" in bar_text(state.connection, counts, 160).plain
    del counts["waiting"]
    assert "waiting" not in bar_text(state.connection, {**counts, "waiting": 0}, 160).plain


def test_placement_events_make_the_queue_stale_and_progress_does_not() -> None:
    state = TuiState()
    for kind in (EventKind.QUEUED, EventKind.PLACED, EventKind.GPU_FAULT):
        change = state.apply_event(
            {"id": 10 + len(state.timeline), "ts": 1.0, "job": "a", "kind": kind, "data": {}}
        )
        assert change.requeue, kind
    state_change = state.apply_event(
        {"ts": 2.0, "job": "a", "kind": EventKind.STATE, "data": {"state": "finished"}}
    )
    assert state_change.requeue  # a holder that ends frees its GPUs
    progress = state.apply_event(
        {"ts": 3.0, "job": "a", "kind": EventKind.PROGRESS, "data": {"step": 1}}
    )
    assert not progress.requeue


async def test_m_opens_the_map_of_a_recorded_daemon_that_never_answered_queue() -> None:
    """The recording holds no `queue` answer, as a daemon before the queue would."""
    app = recorded_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await until_synced(pilot)
        await pilot.press("m")
        await pilot.pause()
        text = screen_text(app)
        assert "holders unknown: this daemon has no `queue` request" in text
        assert "unhealthy: XID 79" in text  # the GPUs are shown all the same
        await pilot.press("escape")
        assert isinstance(app.screen, DashboardScreen)
