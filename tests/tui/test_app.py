"""The app as a whole: startup without a daemon, NO_COLOR, the command palette, the
CLI entry point, what it imports, and the README capture."""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest
from textual.filter import Monochrome, NoColor

from ftsup.supervisor.cli import tui_cmd
from ftsup.tui.app import FtsupApp
from ftsup.tui.capture import screen_text
from ftsup.tui.connection import DaemonConnection, backoff_delay
from ftsup.tui.screens.confirm import ConfirmScreen
from ftsup.tui.screens.dashboard import DashboardScreen
from tests.supervisor_harness import Harness
from tests.tui import update_docs
from tests.tui.conftest import recorded_app, until_synced
from tests.tui.test_live import wait_until

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff_delay(n, 0.25, 2.0) for n in range(1, 7)] == [0.25, 0.5, 1, 2, 2, 2]


async def test_started_before_the_daemon_it_waits_then_connects(harness: Harness) -> None:
    app = FtsupApp(DaemonConnection(harness.runtime_dir / "ftsup.sock", backoff_max=0.3))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.state.connection.attempt >= 2, "retries")
        assert app.state.connection.state == "connecting"
        assert isinstance(app.screen, DashboardScreen)
        assert "connecting…" in screen_text(app)
        await asyncio.to_thread(harness.start_daemon)
        await asyncio.wait_for(app.synced.wait(), 20)
        assert app.state.connection.state == "connected"
        assert "● connected" in screen_text(app)


async def test_no_color_is_honoured_and_nothing_relies_on_colour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = recorded_app()
    assert app.no_color
    assert any(isinstance(f, NoColor | Monochrome) for f in app._filters)
    async with app.run_test(size=(80, 24)) as pilot:
        await until_synced(pilot)
        text = screen_text(app)
        for word in ("running", "gave_up", "finished", "stopped", "FAULT"):
            assert word in text  # states and faults are words, not only colours


async def test_command_palette_offers_the_actions() -> None:
    app = recorded_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await until_synced(pilot)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for wanted in (
            "Stop job gracefully (qwen-lora)",
            "Kill job (qwen-lora)",
            "Restart job (qwen-lora)",
            "Save a checkpoint now (qwen-lora)",
            "Start a job from a job file",
            "GPU map and queue",
            "Open job mistral-dpo",
            "Help",
        ):
            assert wanted in titles
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Kill job")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        assert isinstance(app.screen, ConfirmScreen) and "qwen-lora" in app.screen.title_text
        await pilot.press("escape")
        await pilot.pause()
        assert not app.actions_sent


def test_cli_options() -> None:
    parser = argparse.ArgumentParser()
    tui_cmd.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "tui",
            "--host",
            "me@box",
            "--remote-socket",
            "/run/ftsup/ftsup.sock",
            "-o",
            "Port=2222",
            "--state-dir",
            "/tmp/s",
        ]
    )
    assert args.host == ["me@box"] and args.remote_socket == "/run/ftsup/ftsup.sock"
    assert tui_cmd.ssh_options(args) == ["-o", "Port=2222"]
    bad = parser.parse_args(["tui", "--host", "me@box", "--socket", "/tmp/x.sock"])
    assert bad.func(bad) == 2


def test_the_cli_module_does_not_import_textual_and_the_tui_never_imports_torch() -> None:
    code = (
        "import sys, ftsup.supervisor.cli.tui_cmd; assert 'textual' not in sys.modules; "
        "import ftsup.tui.app, ftsup.tui.ssh; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_committed_captures_are_what_the_code_renders() -> None:
    """docs/tui.md's text blocks and the SVGs it and the README show are current.

    Read-only: `python -m tests.tui.update_docs --update` rewrites them. Rendering twice
    first proves the comparison is deterministic (Rich's random SVG ids normalised).
    """
    first = asyncio.run(update_docs.render())
    second = asyncio.run(update_docs.render())
    assert first == second, "two renders of the recording differ: the check would flap"
    assert "qwen-lora" in first.dashboard_text and "H100" in first.dashboard_text
    assert "loss" in first.job_text
    expected = update_docs.expected_files(first, (DOCS / "tui.md").read_text())
    shown = {
        DOCS / name
        for doc in (DOCS / "tui.md", REPO / "README.md")
        for name in re.findall(r"\(\s*(?:docs/)?(tui-[\w-]+\.svg)\s*\)", doc.read_text())
    }
    assert shown and shown <= set(expected), f"docs show captures nobody renders: {shown}"
    stale = [str(path.relative_to(REPO)) for path in update_docs.stale_files(expected)]
    assert not stale, f"stale TUI captures {stale}: run `{update_docs.UPDATE_COMMAND}`"


async def test_the_cursor_follows_its_job_when_jobs_come_and_go() -> None:
    app = recorded_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await until_synced(pilot)
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        assert screen.current_job() == "qwen-lora"  # live jobs first
        await pilot.press("down", "down")
        assert screen.current_job() == "mistral-dpo"
        assert "mistral-dpo gave_up" in screen_text(app)  # the brief follows the cursor
        # A new job sorts before it: the cursor stays on mistral-dpo.
        app.state.apply_job_status({"name": "aaa-new", "state": "running", "updated_at": 1})
        app._apply(app.state.apply_job_status({"name": "aaa-new", "state": "running"}), now=True)
        await pilot.pause()
        assert screen.current_job() == "mistral-dpo"
        await pilot.press("end")
        assert screen.current_job() == "phi-full"
