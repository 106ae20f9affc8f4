"""Asks for a job file to start (`n`): the path is the confirmation.

The file is read by the app (in a worker) and sent as `start {spec_path,
spec_text}`; the daemon validates it and its error, if any, is shown as is.
"""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static


class StartJobScreen(ModalScreen[str | None]):
    DEFAULT_CSS = """
    StartJobScreen { align: center middle; }
    StartJobScreen > Vertical {
        width: 72; max-width: 100%; height: auto; border: thick $primary;
        background: $surface; padding: 1 2;
    }
    StartJobScreen Horizontal { height: auto; margin-top: 1; align-horizontal: right; }
    StartJobScreen Button { margin-left: 2; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, initial: str = "") -> None:
        super().__init__()
        self.initial = initial

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("[b]Start a job[/b] from a job file (job.toml):")
            yield Input(value=self.initial, placeholder="path/to/job.toml", id="path")
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button("Start", variant="primary", id="start")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self._submit(self.query_one(Input).value)
        else:
            self.dismiss(None)

    def _submit(self, value: str) -> None:
        self.dismiss(value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
