"""Whether a job's trainer is instrumented, as `ftsup status` and the TUI show it.

Built-in trainer jobs always are (the trainer adds `FtsupCallback` itself).
Command jobs are when `[command] instrument` is on (the default) and the process
created a transformers `Trainer`: the bootstrap then writes an `instrumented`
progress line, or `instrument_failed` with the reason when it could not attach
(the trainer then runs on uninstrumented, with progress from its own logs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftsup.supervisor.contract import PROGRESS_INSTRUMENT_FAILED, PROGRESS_INSTRUMENTED
from ftsup.supervisor.spec_types import JobSpec


@dataclass
class Instrumentation:
    """`mode`: builtin | on | off. `state`: attached | waiting | failed | off."""

    mode: str
    state: str
    trainer: str | None = None
    transformers: str | None = None
    error: str | None = None
    pid: int | None = None  # the instrumented process (rank 0): `ftsup save` signals it alone

    @classmethod
    def for_spec(cls, spec: JobSpec) -> Instrumentation:
        if spec.command is None:
            return cls(mode="builtin", state="attached", trainer="ftsup.trainer")
        if not spec.command.instrument:
            return cls(mode="off", state="off")
        return cls(mode="on", state="waiting")

    def begin_attempt(self) -> None:
        """Each attempt is a new process: it has to attach again."""
        if self.mode == "on":
            self.state, self.trainer, self.transformers, self.error = "waiting", None, None, None
            self.pid = None

    def observe(self, record: dict[str, Any]) -> None:
        if self.mode != "on":
            return
        event = record.get("event")
        if event == PROGRESS_INSTRUMENTED:
            self.state, self.error = "attached", None
            self.trainer = _text(record.get("trainer"))
            self.transformers = _text(record.get("transformers"))
            pid = record.get("pid")
            valid = isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
            self.pid = pid if valid else None
        elif event == PROGRESS_INSTRUMENT_FAILED:
            self.state, self.error = "failed", _text(record.get("error")) or "unknown error"

    def can_save(self) -> str | None:
        """Why `ftsup save` must not send SIGUSR2 now (it ends a trainer that does not
        handle it: Python's default action), or None when the trainer handles it."""
        if self.state == "attached":
            return None
        how = {
            "off": "[command] instrument = false",
            "failed": f"instrumentation failed: {self.error}",
            "waiting": "it has not created a transformers Trainer yet",
        }[self.state]
        return (
            f"the trainer is not instrumented ({how}), and SIGUSR2 would end a trainer "
            "that does not handle it; if your command handles it, "
            "`ftsup signal JOB USR2` sends it anyway"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "state": self.state,
            "trainer": self.trainer,
            "transformers": self.transformers,
            "error": self.error,
            "pid": self.pid,
        }


def describe(data: dict[str, Any] | None) -> str:
    """One line for `ftsup status`, from the JSON the daemon serves."""
    if not data:
        return "-"
    mode, state = data.get("mode"), data.get("state")
    if mode == "builtin":
        return "built-in trainer"
    if mode == "off":
        return "off ([command] instrument = false)"
    if state == "attached":
        version = f", transformers {data['transformers']}" if data.get("transformers") else ""
        return f"attached to {data.get('trainer') or 'Trainer'}{version}"
    if state == "failed":
        return f"failed: {data.get('error')}"
    return "waiting (no transformers Trainer created yet)"


def _text(value: Any, limit: int = 500) -> str | None:
    return value[:limit] if isinstance(value, str) else None
