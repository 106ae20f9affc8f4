"""A failure class and a one-line reason for every ended attempt."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftsup.supervisor.daemon.runner import LiveAttempt


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify_attempt(exit_info: dict[str, Any], log_tail: list[str],
                     attempt: LiveAttempt) -> tuple[str | None, str]:
    """(failure kind or None when it did not fail, reason) for the exit record."""
    error = exit_info.get("error")
    if error == "locked":
        return "locked", str(exit_info.get("message", "output folder locked"))
    if error == "spawn":
        return "config_error", str(exit_info.get("message", "cannot start the command"))
    if error == "shim_lost":
        return "unknown", str(exit_info.get("message"))
    code, sig = exit_info.get("returncode"), exit_info.get("signal")
    if code == 0:
        return None, "finished (exit code 0)"
    if code == 75:
        return "stopped", "saved a checkpoint and stopped (exit code 75)"
    if code == 2:
        last = _last_meaningful(log_tail)
        return "config_error", "configuration error (exit code 2)" + (f": {last}" if last else "")
    if sig is not None:
        who = " (stop requested)" if exit_info.get("stop_requested") else ""
        kind = "segfault" if sig == signal.SIGSEGV else "killed"
        return kind, f"killed by {_signal_name(int(sig))}{who}"
    last = _last_meaningful(log_tail)
    return "exception" if last else "unknown", f"exit code {code}" + (f": {last}" if last else "")


def _last_meaningful(lines: list[str]) -> str | None:
    for line in reversed(lines):
        text = line.strip()
        if text:
            return text[:300]
    return None
