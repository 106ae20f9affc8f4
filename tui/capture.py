"""Plain-text captures of the running app (tests, the README, the benchmark).

SVG screenshots (`App.export_screenshot`) show colour; a text capture is what
a test can assert on and what a README can show without an image viewer.
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from textual.app import App


def screen_text(app: App[Any]) -> str:
    """The current screen as the terminal would show it, without styles."""
    width, height = app.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        record=True,
        force_terminal=True,
        color_system=None,
        legacy_windows=False,
    )
    update = app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    console.print(update)
    text = console.export_text(styles=False)
    return "\n".join(line.rstrip() for line in text.splitlines()[:height]) + "\n"
