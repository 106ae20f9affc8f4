"""Fixtures for the TUI tests: a recorded daemon for snapshots, a live one for Pilot tests.

Snapshot tests replay `data/recording.json` (real daemon answers, recorded by
`record_state.py`) with the clock frozen and the time zone fixed, so every
pixel is the same on every machine. Pilot tests use the real daemon of
`tests/conftest.py` (`daemon` fixture) and clean up through it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.pilot import Pilot

from ftsup.tui.app import FtsupApp
from ftsup.tui.recorded import RecordedSource
from ftsup.tui.screens.job import JobScreen

RECORDING = Path(__file__).parent / "data" / "recording.json"


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """Event times print in local time: pin the zone so captures do not depend on the host."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def recorded_app() -> FtsupApp:
    return FtsupApp(RecordedSource.load(RECORDING))


async def until_synced(pilot: Pilot[None], timeout: float = 10.0) -> None:
    app = pilot.app
    assert isinstance(app, FtsupApp)
    await asyncio.wait_for(app.synced.wait(), timeout)
    await pilot.pause()


async def open_first_job(pilot: Pilot[None], tab: str = "curves") -> JobScreen:
    await until_synced(pilot)
    await pilot.press("enter")
    screen = pilot.app.screen
    assert isinstance(screen, JobScreen)
    await asyncio.wait_for(screen.loaded.wait(), 10)
    if tab != "curves":
        screen.action_show_tab(tab)
    await pilot.pause()
    await pilot.pause()
    return screen
