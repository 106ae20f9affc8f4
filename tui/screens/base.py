"""What every data screen shares: the state it reads, the clock, and the sync hooks.

The app owns the state and calls `sync` on the active screen after each
change; a screen that was covered catches up in `on_screen_resume` with a full
sync, so hidden screens cost nothing while events stream in.
"""

from __future__ import annotations

from collections.abc import Callable

from textual.screen import Screen

from ftsup.tui.model import Change, TuiState


class StateScreen(Screen[None]):
    def __init__(self, state: TuiState, clock: Callable[[], float]) -> None:
        super().__init__()
        self.state = state
        self.clock = clock
        self._stale = True

    def sync(self, change: Change) -> None:
        """Show what `change` touched (only called while this screen is active)."""

    def sync_all(self) -> None:
        """Show everything (after the screen was covered, or a reconnect)."""

    def tick(self) -> None:
        """Once a second: refresh what ages with the clock."""

    def current_job(self) -> str | None:
        """The job that the actions (stop, kill, ...) apply to."""
        return None

    def mark_stale(self) -> None:
        self._stale = True

    def on_screen_resume(self) -> None:
        if self._stale:
            self._stale = False
            self.sync_all()
