"""`?`: every key, taken from the bindings themselves so the list cannot go stale."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEY_NAMES = {
    "question_mark": "?",
    "slash": "/",
    "escape": "Esc",
    "enter": "Enter",
    "right_square_bracket": "]",
    "left_square_bracket": "[",
    "ctrl+p": "Ctrl+P",
    "ctrl+q": "Ctrl+Q",
}


def _key(binding: Binding) -> str:
    return ", ".join(KEY_NAMES.get(k.strip(), k.strip()) for k in binding.key.split(","))


def _bindings(items: Iterable[BindingType]) -> list[Binding]:
    return [b for b in items if isinstance(b, Binding)]


def help_table(sections: Sequence[tuple[str, Iterable[BindingType]]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for title, items in sections:
        table.add_row(Text(title, style="bold underline"), "")
        for binding in _bindings(items):
            table.add_row(_key(binding), binding.tooltip or binding.description)
    return table


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 76; max-width: 100%; height: auto; max-height: 100%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    HelpScreen .help-intro { margin-bottom: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, sections: Sequence[tuple[str, Iterable[BindingType]]]) -> None:
        super().__init__()
        self.sections = [(title, list(items)) for title, items in sections]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(
                "[b]ftsup tui[/b]: live view of the ftsup daemon. Actions ask first. "
                "Ctrl+P opens the command palette. Esc closes this.",
                classes="help-intro",
            )
            yield Static(help_table(self.sections))

    def action_close(self) -> None:
        self.dismiss(None)
