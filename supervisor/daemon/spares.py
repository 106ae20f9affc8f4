"""The daemon's spare standbys: warm trainers started before any job asks for one.

A job's own standby (`standby.py`) is started after its attempt's first step.
So the first attempt of every job, and a restart that comes before the job's
standby has warmed (a few seconds of idle CPU after each takeover), pay a
cold start: 4-5 s of imports on a small machine. A spare is the same standby
without a job: `python -m ftsup.trainer.standby` with no `--config`, in the
environment every built-in trainer attempt of this daemon starts from
(`launcher.trainer_base_env`). It can run any one-process built-in trainer
attempt whose environment differs from its own only in what the daemon sets
per job and attempt (`standby.spare_can_take_over`); the activation hands it
the job, its folders and the arguments, and the run tokenizes its data itself.

A launch takes, in order: the job's ready standby, a ready spare, the job's
standby still warming, a spare still warming (`standby.take_warm`). A
fresh spare replaces a used one once no attempt is starting up, so that its
warm-up never competes with a start-up. `[standby] spares` in daemon.toml
(default 1; 0 turns them off); none when torch is not installed beside the
daemon (a supervisor for command jobs only). Until activated a spare lives
only as long as its daemon, like every standby.
"""

from __future__ import annotations

import importlib.util
import subprocess
from typing import Any

from ftsup.supervisor.daemon.launcher import spare_plan, spawn_standby_shim
from ftsup.supervisor.daemon.standby import Emit, Standby, WarmPool, new_folder, remove_stale
from ftsup.supervisor.paths import Layout

SPARES_DIR = "spares"  # in the state folder: the same file system as the run folders


def trainer_installed() -> bool:
    """torch and the built-in trainer importable by this interpreter (looked up, not
    imported: the daemon never loads trainer code)."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "ftsup.trainer"))


class SparePool(WarmPool):
    """The daemon's spares (at most `[standby] spares`), shared by all its jobs."""

    noun = "spare standby"
    without_note = "jobs start cold from now on"
    discard_unfit = False  # another job may fit it
    off_switch = "set [standby] spares = 0 in daemon.toml if that memory is short"

    def __init__(self, layout: Layout, base_env: dict[str, str], emit: Emit, count: int) -> None:
        super().__init__(emit, count, enabled=count > 0 and trainer_installed())
        self.folder = layout.state_dir / SPARES_DIR
        self.plan = spare_plan(base_env, layout.state_dir)
        remove_stale(self.folder)

    def summary(self) -> dict[str, Any]:
        """For `ftsup status`: how many spares are kept, and the next one's state."""
        kept = self.count if self.enabled else 0
        return {"kept": kept, "losses": self.losses, "next": self.to_json()}

    def keep(self, start_allowed: bool) -> None:
        """Called on every pump pass: notice lost or ready spares; start one when
        there are fewer than `count` and `start_allowed` (no attempt is starting)."""
        self.notice()
        if start_allowed and self.wanted:
            self._start()

    def _start(self) -> None:
        folder = new_folder(self.folder)

        def spawn() -> subprocess.Popen[bytes]:
            self.folder.mkdir(mode=0o700, exist_ok=True)  # in the private state folder
            return spawn_standby_shim(None, folder, plan=self.plan, standby_argv=self.plan.argv)

        spawned = self._spawn(folder, spawn, {"spare": True})
        if spawned is not None:
            self.pool.append(Standby(folder, *spawned, self.plan, spare=True))
