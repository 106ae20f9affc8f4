"""Pilot tests of the real app against a real daemon running the real toy trainer.

Every daemon, shim and trainer is started through the `daemon`/`harness`
fixtures (tests/conftest.py), which kill them at teardown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot

from ftsup.tui.app import FtsupApp
from ftsup.tui.capture import screen_text
from ftsup.tui.connection import DaemonConnection
from ftsup.tui.model import JobModel
from ftsup.tui.screens.confirm import ConfirmScreen
from ftsup.tui.screens.dashboard import DashboardScreen
from ftsup.tui.screens.job import JobScreen
from ftsup.tui.screens.start_job import StartJobScreen
from ftsup.tui.widgets.jobs_table import JobsTable
from ftsup.tui.widgets.log_view import LogView
from tests.supervisor_harness import Harness

SIZE = (100, 30)


def live_app(harness: Harness) -> FtsupApp:
    return FtsupApp(DaemonConnection(harness.runtime_dir / "ftsup.sock", backoff_max=0.5))


async def wait_until(
    pilot: Pilot[Any], predicate: Callable[[], Any], what: str, timeout: float = 30.0
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen_text(pilot.app)}")


async def start_job(harness: Harness, name: str, *args: str, **kwargs: Any) -> None:
    spec = harness.toy_job(name, *args, **kwargs)
    await asyncio.to_thread(harness.cli, "start", str(spec))


def shown_step(app: FtsupApp, name: str) -> int:
    """The step in the job's progress cell, as drawn in the table (0 if none yet)."""
    table = app.screen.query_one(JobsTable)
    cell = (table.cell_text(name, "progress").split() or ["–"])[-1]
    return int(cell.split("/")[0]) if cell[0].isdigit() else 0


def job(app: FtsupApp, name: str) -> JobModel | None:
    return app.state.jobs.get(name)


async def test_dashboard_shows_the_job_and_its_step_advancing(daemon: Harness) -> None:
    await start_job(
        daemon, "alpha", "--max-steps", "2000", "--step-time", "0.05", "--save-steps", "10"
    )
    app = live_app(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await asyncio.wait_for(app.synced.wait(), 20)
        assert isinstance(app.screen, DashboardScreen)
        first = await wait_until(pilot, lambda: shown_step(app, "alpha"), "a first step")
        await wait_until(pilot, lambda: shown_step(app, "alpha") >= first + 5, "steps advancing")
        text = screen_text(app)
        assert "alpha" in text and "running" in text and "/2000" in text
        assert "1 running" in text

        # The job screen: live log lines, search, filter.
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, JobScreen) and screen.job_name == "alpha"
        await asyncio.wait_for(screen.loaded.wait(), 20)
        await pilot.press("4")
        view = screen.query_one(LogView)
        await wait_until(pilot, lambda: view.log_widget.line_count > 10, "log lines")
        await pilot.press("slash", *"step 3", "enter")
        await wait_until(pilot, lambda: view.matches, "search matches")
        assert not view.follow  # jumping to a match stops following
        await pilot.press("escape", "g", *"loss", "enter")
        await pilot.pause()
        assert view.filter_text == "loss"
        assert all("loss" in line for line in view.log_widget.lines)
        # Checkpoints: the daemon's verdicts (from `checkpoints`, or its events).
        await pilot.press("escape", "2")
        await wait_until(
            pilot,
            lambda: (rows := screen.job.checkpoint_rows()[0]) and len(rows) >= 1,
            "checkpoints",
        )
        await pilot.pause(0.3)
        assert "checkpoint-" in screen_text(app) and "valid" in screen_text(app)
        await pilot.press("escape")  # back to the dashboard
        assert isinstance(app.screen, DashboardScreen)


async def test_a_crash_shows_up_as_an_event_and_a_restart(daemon: Harness) -> None:
    await start_job(
        daemon,
        "crashy",
        "--max-steps",
        "2000",
        "--step-time",
        "0.05",
        "--save-steps",
        "5",
        "--crash-at",
        "12",
    )
    app = live_app(daemon)
    async with app.run_test(size=(160, 40)) as pilot:
        await asyncio.wait_for(app.synced.wait(), 20)
        await wait_until(
            pilot, lambda: (m := job(app, "crashy")) and m.restarts == 1, "the restart count"
        )
        model = job(app, "crashy")
        assert model is not None
        kinds = [e["kind"] for e in model.events]
        assert "attempt_exited" in kinds and "restart" in kinds
        await wait_until(
            pilot,
            lambda: model.state == "running" and shown_step(app, "crashy") > 12,
            "the resumed attempt running past the crash",
        )
        table = app.screen.query_one(JobsTable)
        assert table.cell_text("crashy", "restarts") == "1"
        text = screen_text(app)
        assert "restart" in text and "exit code 1" in text  # the dashboard's recent events


async def test_stop_action_asks_then_stops_the_job(daemon: Harness) -> None:
    await start_job(daemon, "stoppable", "--max-steps", "5000", "--step-time", "0.05")
    app = live_app(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await asyncio.wait_for(app.synced.wait(), 20)
        await wait_until(pilot, lambda: shown_step(app, "stoppable") > 2, "the job running")
        await pilot.press("k")  # kill asks first; "n" cancels and sends nothing
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert not isinstance(app.screen, ConfirmScreen) and not app.actions_sent
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_until(pilot, lambda: app.actions_sent, "the stop request")
        assert list(app.actions_sent) == [("stop", {"job": "stoppable", "now": False})]
        await wait_until(
            pilot,
            lambda: (m := job(app, "stoppable")) and m.state == "stopped",
            "the job shown as stopped",
        )
        status = await asyncio.to_thread(daemon.status, "stoppable")
        assert status["state"] == "stopped"
        assert status["last_exit"]["returncode"] == 75  # it saved and exited on SIGTERM


async def test_start_action_submits_a_job_file(daemon: Harness) -> None:
    spec = daemon.toy_job("fresh", "--max-steps", "30", "--step-time", "0.02")
    app = live_app(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await asyncio.wait_for(app.synced.wait(), 20)
        await pilot.press("n")
        assert isinstance(app.screen, StartJobScreen)
        await pilot.press(*str(spec), "enter")
        await wait_until(
            pilot,
            lambda: (m := job(app, "fresh")) and m.state == "finished",
            "the submitted job to finish",
            timeout=40,
        )


async def test_reconnects_after_the_daemon_is_killed_and_restarted(daemon: Harness) -> None:
    await start_job(daemon, "survivor", "--max-steps", "5000", "--step-time", "0.05")
    app = live_app(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await asyncio.wait_for(app.synced.wait(), 20)
        await wait_until(pilot, lambda: shown_step(app, "survivor") > 2, "the job running")
        await asyncio.to_thread(daemon.kill_daemon)
        await wait_until(
            pilot, lambda: app.state.connection.state == "reconnecting", "the reconnecting state"
        )
        await pilot.pause(0.3)
        assert "reconnecting" in screen_text(app)
        before = shown_step(app, "survivor")
        await asyncio.to_thread(daemon.start_daemon)
        await wait_until(pilot, lambda: app.state.connection.state == "connected", "the reconnect")
        await asyncio.wait_for(app.synced.wait(), 20)
        assert "reconnecting" not in screen_text(app)
        # Current again: the re-adopted run's steps keep arriving.
        await wait_until(
            pilot, lambda: shown_step(app, "survivor") > before + 5, "steps after the reconnect"
        )
        status = await asyncio.to_thread(daemon.status, "survivor")
        assert abs(status["progress"]["step"] - shown_step(app, "survivor")) < 40
