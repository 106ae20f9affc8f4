"""Snapshots (pytest-textual-snapshot) of every screen at 80x24 and 160x48.

They replay a recording of a real daemon (see conftest.py), so they are
deterministic; `pytest tests/tui --snapshot-update` rewrites them after an
intended change (look at the report before committing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from textual.pilot import Pilot

from tests.tui.conftest import open_first_job, recorded_app, until_synced

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((160, 48), id="160x48")]
SnapCompare = Callable[..., bool]


@pytest.mark.parametrize("size", SIZES)
def test_dashboard(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(recorded_app(), terminal_size=size, run_before=until_synced)


@pytest.mark.parametrize("size", SIZES)
def test_job_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await open_first_job(pilot)

    assert snap_compare(recorded_app(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("tab", ["events", "log", "checkpoints"])
def test_job_screen_tabs(snap_compare: SnapCompare, tab: str) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await open_first_job(pilot, tab)

    assert snap_compare(recorded_app(), terminal_size=(80, 24), run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_help_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await until_synced(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(recorded_app(), terminal_size=size, run_before=run_before)


def test_gpu_map_screen(snap_compare: SnapCompare) -> None:
    """`m`: the recording's daemon never answered `queue`, so holders read `?`."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await until_synced(pilot)
        await pilot.press("m")
        await pilot.pause()

    assert snap_compare(recorded_app(), terminal_size=(80, 24), run_before=run_before)
