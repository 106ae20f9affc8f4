"""A failure class and a one-line reason for every ended attempt."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftsup.supervisor.health.diagnosis import FailureKind, classify_failure

if TYPE_CHECKING:
    from ftsup.supervisor.daemon.attempt import LiveAttempt


def classify_attempt(
    exit_info: dict[str, Any], log_tail: list[str], attempt: LiveAttempt
) -> tuple[str | None, str]:
    """(failure kind or None when it did not fail, reason) for the exit record."""
    error = exit_info.get("error")
    if error == "locked":
        return "locked", str(exit_info.get("message", "output folder locked"))
    if error == "spawn":
        return "config_error", str(exit_info.get("message", "cannot start the command"))
    if error == "shim_lost":
        return "unknown", str(exit_info.get("message"))
    code, sig = exit_info.get("returncode"), exit_info.get("signal")
    killed_by = exit_info.get("killed_by") or ("user" if exit_info.get("stop_requested") else None)
    diagnosis = classify_failure(
        code, sig, "\n".join(log_tail), killed_by=killed_by, oom_record=exit_info.get("oom_record")
    )
    if diagnosis.kind == FailureKind.FINISHED:
        return None, "finished (exit code 0)"
    return diagnosis.kind.value, diagnosis.reason
