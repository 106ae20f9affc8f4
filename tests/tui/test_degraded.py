"""The TUI says when the daemon's state disk refuses writes (issue 12, defect 3)."""

from __future__ import annotations

from ftsup.tui.model import TuiState
from ftsup.tui.widgets.connection_bar import bar_text

REASON = "cannot write the state database (database or disk is full)"


def _connected() -> TuiState:
    state = TuiState()
    state.connection.state = "connected"
    state.connection.daemon = {"daemon_pid": 4242}
    return state


def test_degraded_event_shows_in_the_top_line_until_recovered() -> None:
    state = _connected()
    assert "degraded" not in bar_text(state.connection, {}, 100).plain

    change = state.apply_event(
        {"id": 7, "ts": 1.0, "job": None, "kind": "degraded", "message": REASON, "data": {}}
    )
    assert change.connection
    line = bar_text(state.connection, {"running": 1}, 160).plain
    assert "degraded" in line and "disk is full" in line
    assert "connected" not in line  # not shown as a healthy daemon

    state.apply_event(
        {
            "id": 8,
            "ts": 2.0,
            "job": None,
            "kind": "recovered",
            "message": "state written back",
            "data": {},
        }
    )
    line = bar_text(state.connection, {"running": 1}, 160).plain
    assert "connected" in line and "degraded" not in line


def test_status_answer_carries_the_degraded_state() -> None:
    """A TUI attached while the daemon is already degraded learns it from `status`."""
    state = _connected()
    change = state.apply_status_list({"jobs": [], "degraded": REASON})
    assert change.connection and state.connection.degraded == REASON
    state.apply_status_list({"jobs": [], "degraded": None})
    assert state.connection.degraded is None
