"""One job's warm standbys, as the daemon keeps them (see `ftsup.supervisor.standby_shim`),
and the pool mechanics (`WarmPool`) that the daemon's spares (`spares.py`) share.

The runner asks `StandbyKeeper.keep_warm` on every pump while an attempt
trains, and `take` when it launches the next attempt: a ready (or still
warming) standby that can run exactly the planned command becomes the new
attempt, so the restart skips the cold start. `[restart] standby_count`
standbys per job (default one), started only after the attempt's first step so
that they never compete with the attempt's own start-up, one per pump; a fresh
one replaces each one used. A second one matters when failures come closer
together than a warm-up (seconds of idle CPU): the next restart still finds a
ready one. A standby that dies before use is reported (`standby_lost`, with
its log's tail); after `MAX_LOSSES` the job runs without one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftsup.supervisor import contract
from ftsup.supervisor.atomicio import read_json, tail_lines, write_json_atomic
from ftsup.supervisor.daemon.launcher import TRANSIENT_ERRNOS, AttemptPlan, spawn_standby_shim
from ftsup.supervisor.procinfo import ProcessUnreadable, is_same_process, process_start_time
from ftsup.supervisor.spec_types import JobSpec
from ftsup.supervisor.standby_shim import ACTIVATION_FILE, FIFO_NAME, STANDBY_FILE
from ftsup.supervisor.trainer_launch import split_single_process_argv, standby_argv

log = logging.getLogger("ftsup.daemon")
MAX_LOSSES = 3
STANDBY_PREFIX = "standby-"
_numbers = itertools.count(1)

Emit = Callable[[str, str, dict[str, Any] | None], object]


@dataclass
class Standby:
    """A standby shim this daemon started, with what it was started to run. `spare`:
    a daemon's spare (`spares.py`), started before any job, for whichever fits."""

    directory: Path
    shim: subprocess.Popen[bytes]
    shim_start: int | None
    plan: AttemptPlan
    spawned_at: float = field(default_factory=time.time)
    ready_reported: bool = False
    spare: bool = False

    def ready(self) -> bool:
        return self.info().get("state") == "ready"

    def info(self) -> dict[str, Any]:
        """standby.json; empty while it is not written yet, or cannot be read now (out
        of descriptors, a failing disk): no reason to judge the standby either way."""
        try:
            return read_json(self.directory / STANDBY_FILE) or {}
        except OSError:
            return {}

    def alive(self) -> bool:
        return self.shim.poll() is None

    def can_run(self, plan: AttemptPlan) -> bool:
        if self.spare:
            cuda = bool(self.info().get("cuda_initialized"))
            return spare_can_take_over(self.plan, plan, cuda_initialized=cuda)
        return can_take_over(self.plan, plan)

    def activate(self, attempt_dir: Path, attempt: int, spec: JobSpec, plan: AttemptPlan) -> bool:
        """Turn the standby into `attempt`: its folder becomes the attempt's, the
        shim is told where. False (folder renamed back) when the shim is gone."""
        _, args = split_single_process_argv(plan.argv) or ([], [])
        activation = {
            "attempt": attempt,
            "job": spec.name,
            "args": args,
            "env": plan.env,
            "cwd": str(plan.cwd),
            "output_dir": str(spec.output_dir),
            "grace": spec.restart.stop_grace,
        }
        command = {"argv": plan.argv, "cwd": str(plan.cwd), "standby": True, "spare": self.spare}
        try:  # a dying shim may be removing its folder right now
            write_json_atomic(self.directory / ACTIVATION_FILE, activation)
            write_json_atomic(self.directory / "command.json", command)
            self.directory.rename(attempt_dir)
        except OSError:
            return False
        try:
            fifo = os.open(attempt_dir / FIFO_NAME, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader, the shim has died
            with contextlib.suppress(OSError):
                attempt_dir.rename(self.directory)
            return False
        try:
            os.write(fifo, f"{attempt_dir}\n".encode())
        finally:
            os.close(fifo)
        self.directory = attempt_dir
        return True

    def discard(self) -> None:
        """SIGTERM: the shim kills its trainer and removes its folder."""
        # Our own unreaped child (`alive`): its pid is not another's; the start time,
        # when it could be read, says so twice.
        if self.alive() and (
            self.shim_start is None or is_same_process(self.shim.pid, self.shim_start)
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.shim.pid, signal.SIGTERM)


def can_take_over(standby_plan: AttemptPlan, plan: AttemptPlan) -> bool:
    """The same interpreter, config and folder, and the same environment but for
    the per-attempt variables: then activating the standby equals a cold start."""
    mine = split_single_process_argv(standby_plan.argv)
    theirs = split_single_process_argv(plan.argv)
    if mine is None or theirs is None or mine[0] != theirs[0] or plan.cwd != standby_plan.cwd:
        return False
    config = mine[1][: mine[1].index("--config") + 2]
    if theirs[1][: len(config)] != config:
        return False
    return _without(plan.env, contract.PER_ATTEMPT_ENV) == _without(
        standby_plan.env, contract.PER_ATTEMPT_ENV
    )


def spare_can_take_over(
    spare_plan: AttemptPlan, plan: AttemptPlan, *, cuda_initialized: bool
) -> bool:
    """A spare runs any one-process built-in trainer of the same interpreter whose
    environment equals its own but for what the daemon sets per job and attempt:
    the trainer reads those only once it runs, and CUDA reads the device variables
    when it is initialised, which a spare has not done (unless `cuda_initialized`:
    an import touched the GPU, then the devices must match too). The folder and
    the data come with the activation."""
    theirs = split_single_process_argv(plan.argv)
    if theirs is None or theirs[0][0] != spare_plan.argv[0]:
        return False
    ignored = contract.PER_ATTEMPT_ENV | contract.PER_JOB_ENV
    if not cuda_initialized:
        ignored |= contract.DEVICE_ENV
    return _without(plan.env, ignored) == _without(spare_plan.env, ignored)


def _without(env: dict[str, str], names: frozenset[str]) -> dict[str, str]:
    """Every other variable must equal the standby's own, which its imports may
    already have read (HF_HOME, OMP_NUM_THREADS, ...)."""
    return {k: v for k, v in env.items() if k not in names}


def new_folder(parent: Path) -> Path:
    """A fresh standby folder's name under `parent` (this daemon's pid, a counter)."""
    return parent / f"{STANDBY_PREFIX}{os.getpid()}-{next(_numbers)}"


def remove_stale(parent: Path) -> None:
    """Standby folders under `parent` whose shims are gone (an earlier daemon's)."""
    for folder in parent.glob(f"{STANDBY_PREFIX}*"):
        info = read_json(folder / STANDBY_FILE) or {}
        if not is_same_process(info.get("shim_pid", -1), info.get("shim_start")):
            shutil.rmtree(folder, ignore_errors=True)


class WarmPool:
    """Standbys that wait, oldest first: noticed ready or lost, taken, discarded.
    A job's own (`StandbyKeeper`) and the daemon's spares (`spares.SparePool`)."""

    noun = "warm standby"
    without_note = "restarts start cold from now on"
    discard_unfit = True  # one that cannot run the plan is of no further use
    off_switch = "set [restart] standby = false if that memory is short"

    def __init__(self, emit: Emit, count: int, enabled: bool) -> None:
        self._emit = emit
        self.count = count
        self.enabled = enabled
        self.pool: list[Standby] = []  # oldest first
        self._discarded: list[Standby] = []  # reaped once their shims exit
        self.losses = 0
        self._failing = False  # the last start failed for a reason of the moment
        # Folders of starts that failed, not yet removed (no descriptor to list them).
        self._leftovers: list[Path] = []

    @property
    def current(self) -> Standby | None:
        """The standby the next restart takes: the oldest ready one, else the oldest."""
        order = self._ready_first(lambda s: s.ready_reported)
        return order[0] if order else None

    @property
    def wanted(self) -> bool:
        """One more should be started (when the caller allows)."""
        return self.enabled and len(self.pool) < self.count and self.losses < MAX_LOSSES

    def _spawn(
        self,
        folder: Path,
        spawn: Callable[[], subprocess.Popen[bytes]],
        extra: dict[str, Any] | None,
    ) -> tuple[subprocess.Popen[bytes], int | None] | None:
        """Start a standby's shim in `folder`: the shim and its start time, or None.
        An error of the moment (a full disk, no descriptors left) is tried again on a
        later pass and said once per spell; any other is a loss (`MAX_LOSSES` of them
        and the pool stops: a standby that cannot start must not be tried forever)."""
        try:
            shim = spawn()
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists():
                self._leftovers.append(folder)  # removed on a later pass (_reap)
            if exc.errno in TRANSIENT_ERRNOS:
                if not self._failing:
                    log.warning("cannot start a %s now (%s); trying again later", self.noun, exc)
                self._failing = True
                return None
            self.losses += 1
            self._emit("standby_lost", f"cannot start a {self.noun}: {exc}", extra)
            return None
        self._failing = False
        try:
            started: int | None = process_start_time(shim.pid)
        except ProcessUnreadable:  # our unreaped child: its pid cannot be another's meanwhile
            started = None
        return shim, started

    def _ready_first(self, ready: Callable[[Standby], bool]) -> list[Standby]:
        """The pool, ready ones first, oldest first within each (a stable sort)."""
        return sorted(self.pool, key=lambda standby: not ready(standby))

    def notice(self) -> None:
        """Forget lost standbys (reported) and report newly ready ones."""
        self._reap()
        for standby in [s for s in self.pool if not s.alive()]:
            self.pool.remove(standby)
            self._lost(standby)
        for standby in self.pool:
            self._report_ready(standby)

    def _report_ready(self, standby: Standby) -> None:
        if standby.ready_reported:
            return
        info = standby.info()
        if info.get("state") != "ready":
            return
        standby.ready_reported = True
        data = {
            k: info.get(k)
            for k in ("trainer_pid", "ready_s", "data_prepared", "warm_priority", "frozen_objects")
        }
        self._emit(
            "standby_ready",
            f"{self.noun} ready in {info.get('ready_s', 0):.1f}s (pid {info.get('trainer_pid')})",
            {**data, "spare": standby.spare},
        )
        priority = info.get("warm_priority")
        if isinstance(priority, dict) and priority.get("cpu") != "SCHED_IDLE":
            self._emit(
                "warning",
                f"the {self.noun} warmed at normal priority ({priority.get('cpu')}): "
                "it may have slowed training while it did",
                {"trainer_pid": info.get("trainer_pid"), "warm_priority": priority},
            )
        if info.get("cuda_initialized"):  # an import touched the GPU: it now holds memory
            self._emit(
                "warning",
                f"the {self.noun} initialised CUDA before it was needed and holds GPU memory; "
                + self.off_switch,
                {"trainer_pid": info.get("trainer_pid")},
            )

    def _lost(self, standby: Standby) -> None:
        self.losses += 1
        info = standby.info()
        tail = tail_lines(standby.directory / contract.LOG_FILE, 15)
        how = f"exit code {info['returncode']}" if "returncode" in info else "its shim died"
        gave_up = self.losses >= MAX_LOSSES
        self._emit(
            "standby_lost",
            f"{self.noun} ended before use ({how})" + (f"; {self.without_note}" if gave_up else ""),
            {"log_tail": tail, "losses": self.losses, "spare": standby.spare},
        )
        shutil.rmtree(standby.directory, ignore_errors=True)

    def take(self, plan: AttemptPlan, *, ready_only: bool = False) -> Standby | None:
        """A standby, handed over for `plan` (the caller activates it), or None:
        the oldest ready one, else (unless `ready_only`) the oldest still warming.
        Those that cannot run `plan` are discarded when `discard_unfit` (a job's
        own: its command changed), else left for another job (a spare)."""
        self._reap()
        for standby in self._ready_first(lambda s: s.ready_reported or s.ready()):
            if ready_only and not (standby.ready_reported or standby.ready()):
                continue
            alive, info = standby.alive(), standby.info()
            if alive and not info:  # not reachable yet (or unreadable now): keep it for later
                continue
            # standby.json exists once the shim has opened its FIFO: activation can reach it.
            fit = alive and standby.can_run(plan)
            if not fit and not self.discard_unfit and alive:
                continue
            self.pool.remove(standby)
            if fit:
                return standby
            self.discard_taken(standby)
        return None

    def discard_taken(self, standby: Standby) -> None:
        """Discard a standby that `take` handed out but that was not activated."""
        standby.discard()
        self._discarded.append(standby)

    def discard(self) -> None:
        for standby in self.pool:
            self.discard_taken(standby)
        self.pool = []

    @property
    def unsettled(self) -> bool:
        """A standby still warming (its readiness not yet reported) or one still being
        discarded, or one missing: the pump keeps looking."""
        return self.wanted or self.discarding or not all(s.ready_reported for s in self.pool)

    @property
    def discarding(self) -> bool:
        """Discarded standbys whose shims have not exited yet (keep pumping)."""
        return bool(self._discarded)

    def _reap(self) -> None:
        """Forget discarded standbys whose shims exited, and remove their folders: a
        shim SIGTERMed before it set its handler (it had started no trainer yet)
        dies without removing its own."""
        for standby in [s for s in self._discarded if not s.alive()]:
            shutil.rmtree(standby.directory, ignore_errors=True)
        self._discarded = [s for s in self._discarded if s.alive()]
        for folder in self._leftovers:
            shutil.rmtree(folder, ignore_errors=True)
        self._leftovers = [folder for folder in self._leftovers if folder.exists()]

    def to_json(self) -> dict[str, Any] | None:
        """The standby the next restart takes, and how many are warm of how many kept."""
        standby = self.current
        if standby is None:
            return None
        info = standby.info()
        return {
            "state": info.get("state", "starting"),
            "pid": info.get("trainer_pid"),
            "ready_s": info.get("ready_s"),
            "since": standby.spawned_at,
            "warm_priority": info.get("warm_priority"),
            "ready": sum(s.ready_reported for s in self.pool),
            "count": len(self.pool),
        }


def take_warm(pools: list[WarmPool], plan: AttemptPlan) -> tuple[WarmPool, Standby] | None:
    """A ready standby of the first pool that has one (the job's own, then the
    daemon's spares), else a warming one in the same order: what is left of a
    warm-up is still less than a cold start. With its pool, to discard it there
    if its activation fails."""
    for ready_only in (True, False):
        for pool in pools:
            standby = pool.take(plan, ready_only=ready_only)
            if standby is not None:
                return pool, standby
    return None


class StandbyKeeper(WarmPool):
    """One job's standbys (at most `standby_count`): started, watched, taken or discarded."""

    def __init__(self, spec: JobSpec, run_dir: Path, emit: Emit) -> None:
        super().__init__(
            emit,
            spec.restart.standby_count,
            enabled=(
                spec.restart.standby
                and spec.train is not None
                and not spec.launch.distributed
                and not spec.launch.deepspeed
                and not spec.launch.fsdp  # both always run under distrun: nothing to take over
            ),
        )
        self.spec = spec
        self.run_dir = run_dir
        remove_stale(run_dir)

    def keep_warm(self, plan: Callable[[], AttemptPlan], start_one: bool) -> None:
        """Called on every pump: notice lost or ready standbys; start one when there
        are fewer than `count` and `start_one` (the current attempt has stepped)."""
        self.notice()
        if start_one and self.wanted:
            self._start(plan())

    def _start(self, plan: AttemptPlan) -> None:
        argv = standby_argv(plan.argv)
        if argv is None:
            return
        folder = new_folder(self.run_dir)
        spawned = self._spawn(
            folder,
            lambda: spawn_standby_shim(self.spec, folder, plan=plan, standby_argv=argv),
            None,
        )
        if spawned is not None:
            self.pool.append(Standby(folder, *spawned, plan))
