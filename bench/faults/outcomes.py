"""What a case of the fault suite can end in, and how a CLI result is judged
(README "Exit codes").

A case ends in one of four outcomes (see docs/reliability.md):

* ok: it worked;
* clear error: refused with a message and a documented exit code (2, 3, 4, 5), or a
  frame error answered / a connection closed as the protocol documents; no traceback;
* crash: a traceback, an `internal` error, the daemon died or stopped answering, a
  hang past a deadline, or something the rules say must be refused was accepted;
* data lost: a run lost (job vanished, unsupervised, restarted from scratch or from an
  older checkpoint than the newest valid one, two trainers at once, a wrong final
  state or exit status), a valid checkpoint quarantined, a file outside ftsup's own
  overwritten, or (other-uid) a secret or the socket reachable by another user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

CLEAR_CODES = (2, 3, 4, 5)  # README "Exit codes": bad input, no daemon, not found, refused


class Outcome(StrEnum):
    OK = "ok"
    CLEAR = "clear error"
    CRASH = "crash"
    LOST = "data lost"


@dataclass
class Case:
    """One tried fault and what came of it."""

    name: str
    outcome: Outcome
    detail: str = ""
    quarantined_valid: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "outcome": str(self.outcome),
            "detail": self.detail[:2000],
            "quarantined_valid": self.quarantined_valid,
        }


@dataclass
class Category:
    """The cases of one category; `error` is a failure of the bench itself, not of ftsup."""

    name: str
    cases: list[Case] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def add(self, case: Case) -> Case:
        self.cases.append(case)
        mark = "" if case.outcome in (Outcome.OK, Outcome.CLEAR) else "  <-- "
        print(f"  [{self.name}] {case.name}: {case.outcome} {mark}{case.detail[:300]}", flush=True)
        return case

    def counts(self) -> dict[str, int]:
        counts = {str(o): sum(1 for c in self.cases if c.outcome == o) for o in Outcome}
        counts["tried"] = len(self.cases)
        counts["quarantined_valid"] = sum(c.quarantined_valid for c in self.cases)
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": self.counts(),
            "error": self.error,
            "seconds": round(self.seconds, 1),
            "cases": [c.to_json() for c in self.cases],
        }


@dataclass(frozen=True)
class Config:
    quick: bool
    seed: int
    root: Path  # this invocation's temporary folder (short: socket path limit)


@dataclass
class CliResult:
    rc: int | None  # None: it did not end before its deadline
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def json(self) -> Any:
        try:
            return json.loads(self.out)
        except ValueError:
            return None


def classify_cli(res: CliResult) -> tuple[Outcome, str]:
    """A CLI result judged by the README's contract: documented code, message, no traceback."""
    text = res.text.strip()
    if res.rc is None:
        return Outcome.CRASH, "hang: the CLI did not answer before its deadline"
    if "Traceback" in text:
        return Outcome.CRASH, f"traceback (exit {res.rc}): {text[-600:]}"
    if "internal" in text.lower() and res.rc != 0:
        return Outcome.CRASH, f"internal error (exit {res.rc}): {text[-400:]}"
    if res.rc == 0:
        return Outcome.OK, text[:200]
    if res.rc in CLEAR_CODES and text:
        return Outcome.CLEAR, f"exit {res.rc}: {text[:300]}"
    return Outcome.CRASH, f"exit {res.rc} (not a documented refusal): {text[-400:]}"
