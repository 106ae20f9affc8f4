"""The key footer, compact below 100 columns so every key of the dashboard fits at 80."""

from __future__ import annotations

from textual import events
from textual.widgets import Footer

COMPACT_BELOW = 100  # columns: the dashboard's keys and the palette hint need ~86 spaced out


class KeyFooter(Footer):
    def on_resize(self, event: events.Resize) -> None:
        self.compact = event.size.width < COMPACT_BELOW
