"""A job's log: follow mode, a filter (only matching lines), and search (jump to matches).

The lines come from the job's bounded `LogBuffer`; this widget shows them
(filtered) in a Textual `Log` capped at the same size, and appends
incrementally when new lines stream in. Search highlights every hit and moves
between them; filtering rebuilds the view from the buffer.
"""

from __future__ import annotations

from typing import ClassVar

from rich.highlighter import Highlighter
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import Input, Log, Static

from ftsup.tui.model import LOG_MAX, LogBuffer


class SearchHighlighter(Highlighter):
    """Reverses every case-insensitive occurrence of the search term."""

    def __init__(self, term: str) -> None:
        self.term = term

    def highlight(self, text: Text) -> None:
        if self.term:
            text.highlight_words([self.term], style="reverse bold", case_sensitive=False)


class LogView(Vertical):
    DEFAULT_CSS = """
    LogView { height: 1fr; }
    LogView > Log { height: 1fr; }
    LogView > .log-status { height: 1; background: $boost; padding: 0 1; }
    LogView > Input { height: 3; display: none; }
    LogView > Input.-open { display: block; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "toggle_follow", "Follow", tooltip="follow new lines on/off"),
        Binding(
            "slash",
            "open_search",
            "Search",
            tooltip="search (Enter: next match); matches are highlighted",
        ),
        Binding("g", "open_filter", "Filter", tooltip="show only lines containing a text"),
        Binding(
            "right_square_bracket", "next_match", "Next", show=False, tooltip="next search match"
        ),
        Binding(
            "left_square_bracket",
            "previous_match",
            "Prev",
            show=False,
            tooltip="previous search match",
        ),
        Binding(
            "escape", "close_input", "Close", show=False, tooltip="close the search or filter box"
        ),
    ]

    def __init__(self, *, max_lines: int = LOG_MAX, id: str | None = None) -> None:
        super().__init__(id=id)
        self.max_lines = max_lines
        self.follow = True
        self.filter_text = ""
        self.search_text = ""
        self.matches: list[int] = []
        self.match_index = -1
        self._mode = "search"
        self._seq = -1
        self._buffer: LogBuffer | None = None
        self._status = ""

    def compose(self) -> ComposeResult:
        yield Log(max_lines=self.max_lines, auto_scroll=True, highlight=False)
        yield Static("", classes="log-status")
        yield Input(placeholder="search", id="log-input")

    @property
    def log_widget(self) -> Log:
        return self.query_one(Log)

    # data --------------------------------------------------------------------
    def show(self, buffer: LogBuffer) -> None:
        """Show what `buffer` holds, appending only what is new since the last call."""
        self._buffer = buffer
        new = buffer.newer_than(self._seq) if self._seq >= 0 else None
        if new is None:
            self._rebuild()
            return
        self._seq = buffer.seq
        shown = [line for line in new if self._keep(line)]
        if shown:
            self.log_widget.write_lines(shown, scroll_end=self.follow)
            if self.search_text:
                self._find_matches(keep_position=True)
        self._update_status()

    def _keep(self, line: str) -> bool:
        return not self.filter_text or self.filter_text.lower() in line.lower()

    def _rebuild(self) -> None:
        log = self.log_widget
        log.clear()
        if self._buffer is not None:
            self._seq = self._buffer.seq
            log.write_lines(
                [ln for ln in self._buffer.lines if self._keep(ln)], scroll_end=self.follow
            )
        self._find_matches(keep_position=False)
        self._update_status()

    # follow, filter, search ---------------------------------------------------
    def action_toggle_follow(self) -> None:
        self.follow = not self.follow
        self.log_widget.auto_scroll = self.follow
        if self.follow:
            self.log_widget.scroll_end(animate=False)
        self._update_status()

    def action_open_search(self) -> None:
        self._open_input("search", self.search_text, "search (Enter: next match, Esc: close)")

    def action_open_filter(self) -> None:
        self._open_input("filter", self.filter_text, "show only lines containing… (Enter)")

    def _open_input(self, mode: str, value: str, placeholder: str) -> None:
        self._mode = mode
        field = self.query_one(Input)
        field.placeholder = placeholder
        field.value = value
        field.add_class("-open")
        field.focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Esc closes the search box when it is open, else goes on to "back"."""
        if action == "close_input":
            return self.query_one(Input).has_class("-open")
        return True

    def action_close_input(self) -> None:
        field = self.query_one(Input)
        if field.has_class("-open"):
            field.remove_class("-open")
            self.log_widget.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        value = event.value.strip()
        if self._mode == "filter":
            self.set_filter(value)
            self.action_close_input()
        elif value != self.search_text:
            self.set_search(value)
        else:
            self.action_next_match()

    def set_filter(self, text: str) -> None:
        self.filter_text = text
        self._rebuild()

    def set_search(self, text: str) -> None:
        self.search_text = text
        log = self.log_widget
        log.highlighter = SearchHighlighter(text)
        log.highlight = bool(text)
        log.notify_style_update()
        log.refresh()
        self._find_matches(keep_position=False)
        if self.matches:
            self.action_next_match()
        self._update_status()

    def _find_matches(self, *, keep_position: bool) -> None:
        if not self.search_text:
            self.matches, self.match_index = [], -1
            return
        term = self.search_text.lower()
        self.matches = [i for i, line in enumerate(self.log_widget.lines) if term in line.lower()]
        if not keep_position:
            self.match_index = -1
        elif self.match_index >= len(self.matches):
            self.match_index = len(self.matches) - 1

    def action_next_match(self) -> None:
        self._jump(+1)

    def action_previous_match(self) -> None:
        self._jump(-1)

    def _jump(self, direction: int) -> None:
        if not self.matches:
            self._update_status()
            return
        self.match_index = (self.match_index + direction) % len(self.matches)
        if self.follow:
            self.action_toggle_follow()  # a person reading a match does not want it to run off
        line = self.matches[self.match_index]
        log = self.log_widget
        log.scroll_to(y=max(0, line - log.size.height // 2), animate=False)
        self._update_status()

    def _update_status(self) -> None:
        parts = ["follow ON" if self.follow else "follow off (f)"]
        if self.filter_text:
            parts.append(f"filter “{self.filter_text}”")
        if self.search_text:
            where = f"{self.match_index + 1}/{len(self.matches)}" if self.matches else "no match"
            parts.append(f"search “{self.search_text}” {where}")
        shown = self.log_widget.line_count
        total = len(self._buffer.lines) if self._buffer is not None else 0
        parts.append(f"{shown} of {total} lines (keeps {self.max_lines})")
        status = " · ".join(parts)
        if status != self._status:  # one line, fixed size: repaint only, no relayout
            self._status = status
            self.query_one(".log-status", Static).update(status, layout=False)
