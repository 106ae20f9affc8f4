"""Where ftsup keeps its state and its socket.

Per user: `$XDG_STATE_HOME/ftsup` and `$XDG_RUNTIME_DIR/ftsup`. The system unit
sets `FTSUP_STATE_DIR=/var/lib/ftsup` and `FTSUP_RUNTIME_DIR=/run/ftsup`. The
environment variables win, so tests and several daemons never share a socket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ftsup.supervisor.contract import ENV_RUNTIME_DIR, ENV_STATE_DIR, PROGRESS_FILE

SOCKET_NAME = "ftsup.sock"
DB_NAME = "ftsup.db"


def default_state_dir() -> Path:
    if explicit := os.environ.get(ENV_STATE_DIR):
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ftsup"


def default_runtime_dir() -> Path:
    if explicit := os.environ.get(ENV_RUNTIME_DIR):
        return Path(explicit)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "ftsup"
    return Path(f"/tmp/ftsup-{os.getuid()}")


@dataclass(frozen=True)
class Layout:
    """All paths of one daemon instance."""

    state_dir: Path
    runtime_dir: Path

    @classmethod
    def from_env(cls, state_dir: Path | None = None, runtime_dir: Path | None = None) -> Layout:
        return cls(
            state_dir=(state_dir or default_state_dir()).absolute(),
            runtime_dir=(runtime_dir or default_runtime_dir()).absolute(),
        )

    @property
    def socket(self) -> Path:
        return self.runtime_dir / SOCKET_NAME

    @property
    def db(self) -> Path:
        return self.state_dir / DB_NAME

    @property
    def daemon_config(self) -> Path:
        return self.state_dir / "daemon.toml"

    @property
    def daemon_log(self) -> Path:
        return self.state_dir / "daemon.log"

    def run_dir(self, job: str) -> Path:
        return self.state_dir / "runs" / job

    def attempt_dir(self, job: str, attempt: int) -> Path:
        return self.run_dir(job) / f"attempt-{attempt}"

    def progress_file(self, job: str) -> Path:
        return self.run_dir(job) / PROGRESS_FILE
