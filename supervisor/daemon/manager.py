"""All jobs of one daemon: submission, re-adoption after a restart, the pump loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

from ftsup.supervisor import outlock
from ftsup.supervisor.atomicio import read_json
from ftsup.supervisor.checkpoints import discovery
from ftsup.supervisor.contract import EXIT_FILE, PIDS_FILE
from ftsup.supervisor.daemon.attempt import LiveAttempt
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.diagnose import classify_attempt
from ftsup.supervisor.daemon.launcher import lock_group
from ftsup.supervisor.daemon.placement import Placement, trainer_gpus
from ftsup.supervisor.daemon.runner import JobRunner, Preflight
from ftsup.supervisor.daemon.spares import SparePool
from ftsup.supervisor.daemon.wakeups import FALLBACK_POLL_S, InotifyUnavailable, PumpWakeups
from ftsup.supervisor.memory_tier import new_lineage
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.protocol import STREAM_ONLY_KINDS, RequestError
from ftsup.supervisor.resume import CheckpointsUncheckable, ResumePoint
from ftsup.supervisor.spec import SpecError, parse_spec
from ftsup.supervisor.spec_types import JobSpec
from ftsup.supervisor.store import AttemptRow, Store
from ftsup.supervisor.userfiles import call_with_deadline, in_thread

log = logging.getLogger("ftsup.daemon")
PUMP_INTERVAL = 0.2  # the pump's shortest rest: appends during it are read together
SLOW_PASS_S = 1.0  # running jobs are read this often even when nothing wakes the pump
OUTPUT_CHECK_TIMEOUT = 10.0
SELECT_TIMEOUT = 300.0  # the fast path takes milliseconds; this is for dead mounts


def select_resume(spec: JobSpec) -> ResumePoint:
    """The newest valid, resumable checkpoint; invalid newer ones are quarantined
    (by a single-node job's daemon; a multi-node job's rank 0 does it).

    Called only while no trainer of the job runs, so a half-written newest
    folder is an interrupted save, not one in progress. A built-in trainer job
    always writes a manifest last, so a folder without one (even the first) is
    unsealed and never resumed. Raises CheckpointsUncheckable when the newest
    candidates could not be read (EMFILE, EACCES, EIO, the deadline): nothing is
    quarantined on that, and the runner waits and tries again.
    """

    def choose() -> discovery.ResumeChoice:
        return discovery.select_resume(
            spec.output_dir,
            world_size=spec.launch.world_size,
            require_manifest=True if spec.train is not None else None,
            # A multi-node job's other nodes may still be writing into the shared
            # folder: only its rank 0 quarantines, once all nodes met (trainer/nodes.py).
            quarantine=spec.launch.nnodes == 1,
        )

    try:
        choice = call_with_deadline(choose, SELECT_TIMEOUT, f"checking {spec.output_dir}")
    except OSError as exc:  # listing failed, or the deadline passed
        raise CheckpointsUncheckable(
            f"could not check the checkpoints in {spec.output_dir}: {exc}"
        ) from None
    moved = [(q.moved_to, q.report.reason or "invalid") for q in choice.quarantined]
    if choice.unchecked is not None:
        also = "".join(f"; quarantined {path.name}: {why}" for path, why in moved)
        raise CheckpointsUncheckable(
            f"{choice.unchecked.path.name}: {choice.unchecked.reason}{also}"
        )
    return ResumePoint(choice.path, choice.step or 0, moved)


def _process_mentions(text: str) -> bool:
    """True when a live process has `text` as one of its arguments."""
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in argv:
            return True
    return False


def check_output_dir(
    output_dir: Path, live: list[tuple[str, str, str]], group: str | None = None
) -> None:
    """Refuse an output folder that no run could use, or that another live job
    (`(name, state, output_dir)`) writes to, under any alias (compared by real
    path: a symlink or `..` must not let two runs share checkpoints).

    Touches the user's file system: call it in a worker thread.
    """
    problem = outlock.output_dir_problem(output_dir)
    if problem is not None:
        raise RequestError("bad_request", problem, {"output_dir": str(output_dir)})
    real = os.path.realpath(output_dir)
    for name, state, other in live:
        if os.path.realpath(other) == real:
            alias = "" if str(other) == str(output_dir) else f" (as {other})"
            raise RequestError(
                "output_locked",
                f"{output_dir} is in use by job {name!r}{alias} ({state}); two runs "
                "must never write the same checkpoints: stop it first or choose "
                "another [job] output_dir",
                {"holder": name},
            )
    try:
        locked = outlock.is_locked(output_dir, group=group)
    except outlock.LockFileUnusable as exc:
        raise RequestError("bad_request", str(exc), {"output_dir": str(output_dir)}) from None
    except OSError as exc:
        raise RequestError(
            "bad_request",
            f"cannot check the lock {outlock.lock_path(output_dir)}: {exc.strerror or exc}",
        ) from None
    if locked:
        who = outlock.read_holder(output_dir) or {}
        raise RequestError(
            "output_locked",
            f"{output_dir} is locked by job "
            f"{who.get('job')!r} (pid {who.get('pid')}), outside this "
            "daemon's jobs",
            {"holder": who.get("job")},
        )


class JobManager:
    def __init__(
        self,
        store: Store,
        bus: EventBus,
        layout: Layout,
        env: dict[str, str],
        preflight: Preflight | None = None,
        spares: int = 0,
    ) -> None:
        self.store = store
        self.preflight = preflight
        self.bus = bus
        self.layout = layout
        self.env = env
        # Warm trainers for any job's launch (`[standby] spares` in daemon.toml).
        self.spares = SparePool(
            layout, env, lambda kind, message, data: bus.emit(None, kind, message, data), spares
        )
        self.runners: dict[str, JobRunner] = {}
        self.placement = Placement(store, bus)
        self.placement.preempt = self._preempt
        self.placement.remaining = self._remaining
        self._pump_task: asyncio.Task[None] | None = None
        self.wakeups = PumpWakeups()
        self._submitting = asyncio.Lock()

    def _remaining(self, job: str) -> float | None:
        runner = self.runners.get(job)
        return runner.progress.eta_s() if runner is not None else None

    def _preempt(self, victim: str, for_job: str) -> None:
        runner = self.runners.get(victim)
        if runner is not None:
            runner.request_preempt(for_job)

    def _runner(self, spec: JobSpec) -> JobRunner:
        runner = JobRunner(
            spec,
            store=self.store,
            bus=self.bus,
            layout=self.layout,
            select_resume=select_resume,
            classify=classify_attempt,
            env=self.env,
            preflight=self.preflight,
            placement=self.placement,
            spares=self.spares,
        )
        self.runners[spec.name] = runner
        self.wakeups.changed({spec.name})  # its first read; its folders to watch
        return runner

    # submission -----------------------------------------------------------
    async def submit(self, spec: JobSpec, *, accept_drift: bool = False) -> JobRunner:
        """Accept a job, or refuse it with a code and a message that says the fix.

        The output folder is the user's: every look at it (stat, realpath, the
        lock probe) runs in a worker thread with a deadline, so a FIFO, a dead
        mount or a symlink loop there can never freeze the daemon's loop.
        """
        async with self._submitting:  # one at a time: the checks await
            return await self._submit(spec, accept_drift)

    async def _submit(self, spec: JobSpec, accept_drift: bool) -> JobRunner:
        existing = self.store.get_job(spec.name)
        if existing is not None and existing.live:
            raise RequestError(
                "job_exists",
                f"a job named {spec.name!r} is already "
                f"{existing.state}; stop it first or choose another [job] name",
            )
        live = [
            (job.name, job.state, job.output_dir)
            for job in self.store.jobs()
            if job.live and job.name != spec.name
        ]
        try:
            await in_thread(
                lambda: check_output_dir(spec.output_dir, live, lock_group(spec)),
                OUTPUT_CHECK_TIMEOUT,
                f"checking {spec.output_dir}",
            )
        except TimeoutError:
            raise RequestError(
                "bad_request",
                f"output_dir {spec.output_dir} did not answer within "
                f"{OUTPUT_CHECK_TIMEOUT:g}s (an unresponsive file system?); "
                "fix it or choose another [job] output_dir",
            ) from None
        run_dir = self.layout.run_dir(spec.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.toml").write_text(spec.text)
        new_lineage(run_dir)  # a new run: no memory snapshot of an earlier one is resumed
        self.store.upsert_job(
            name=spec.name,
            spec_path=str(spec.source),
            spec_text=spec.text,
            kind="command" if spec.command else "train",
            output_dir=str(spec.output_dir),
            state="pending",
            accept_drift=accept_drift,
        )
        self.bus.emit(spec.name, "submitted", f"job {spec.name} submitted from {spec.source}")
        runner = self._runner(spec)
        runner.start()
        return runner

    def restart(self, name: str) -> JobRunner:
        runner = self.runners.get(name)
        job = self.store.get_job(name)
        if job is None:
            raise RequestError("not_found", f"no job named {name!r}")
        if runner is not None and job.live:
            runner.request_restart()
            return runner
        spec = parse_spec(job.spec_text, Path(job.spec_path))
        self.store.reset_first_attempt(name)
        self.store.set_job_state(name, "pending", "restarted on request")
        self.bus.emit(name, "restart", "restarted on request")
        runner = self._runner(spec)
        runner.start()
        return runner

    # re-adoption ----------------------------------------------------------
    def restore(self) -> None:
        """Pick up every live job of an earlier daemon; never start a run twice."""
        for job in self.store.jobs():
            if not job.live:
                continue
            try:
                spec = parse_spec(job.spec_text, Path(job.spec_path))
            except SpecError as exc:
                self.store.set_job_state(job.name, "failed", f"stored spec no longer valid: {exc}")
                continue
            runner = self._runner(spec)
            attempt = self.store.last_attempt(job.name)
            if attempt is not None and attempt.ended_at is None and self._never_ran(attempt):
                runner.stop_requested = attempt.stop_requested
                self.store.update_attempt(
                    job.name,
                    attempt.n,
                    ended_at=attempt.started_at,
                    stop_requested=True,  # not a failure: policy must not count it
                    failure_kind="not_started",
                    reason="never started: the daemon stopped before launching it",
                )
                self.bus.emit(
                    job.name,
                    "warning",
                    f"attempt {attempt.n} was recorded but never started (the daemon "
                    "stopped before launching it); launching it again",
                    {"attempt": attempt.n},
                )
                runner.start()
            elif attempt is not None and attempt.ended_at is None:
                live = self._adopt(job.name, attempt)
                runner.stop_requested = attempt.stop_requested
                runner._begin_attempt(live)
                runner.start(adopt=live)
                self.bus.emit(
                    job.name,
                    "adopted",
                    f"re-adopted attempt {attempt.n} (shim pid {live.shim_pid})",
                    {"attempt": attempt.n, "shim_pid": live.shim_pid},
                )
            elif job.state == "backoff" and job.next_start_at is not None:
                runner.start(delay=max(0.0, job.next_start_at - time.time()))
            elif attempt is not None and attempt.ended_at is not None and runner.history():
                # The earlier daemon recorded the exit but died before its verdict:
                # a run that finished must not be launched once more.
                runner.start(judge_last=True)
            else:
                runner.start()
        # Before any runner task runs: who holds which GPU, as the last daemon left it.
        running = {
            name: gpus
            for name, runner in self.runners.items()
            if runner.attempt is not None
            and (gpus := trainer_gpus(runner.attempt.pids())) is not None
        }
        self.placement.restore(
            {name: runner.spec for name, runner in self.runners.items()}, running
        )
        for runner in self.runners.values():
            runner.gpus = self.placement.held(runner.name)

    def _never_ran(self, attempt: AttemptRow) -> bool:
        """The daemon died between recording the attempt and spawning its shim:
        no shim pid recorded, no pids.json or exit record, and no process running
        with this attempt's folder on its command line (a shim just starting)."""
        if attempt.shim_pid is not None:
            return False
        attempt_dir = self.layout.attempt_dir(attempt.job, attempt.n)
        if (attempt_dir / PIDS_FILE).exists() or (attempt_dir / EXIT_FILE).exists():
            return False
        return not _process_mentions(str(attempt_dir))

    def _adopt(self, job: str, attempt: AttemptRow) -> LiveAttempt:
        attempt_dir = self.layout.attempt_dir(job, attempt.n)
        shim_pid, shim_start = attempt.shim_pid, attempt.shim_start
        if shim_pid is None:  # the daemon died between spawning the shim and recording it
            pids = read_json(attempt_dir / PIDS_FILE) or {}
            shim_pid, shim_start = pids.get("shim_pid", -1), pids.get("shim_start")
        return LiveAttempt(
            n=attempt.n,
            attempt_dir=attempt_dir,
            shim_pid=int(shim_pid or -1),
            shim_start=shim_start,
            start_step=attempt.start_step,
            resume_from=Path(attempt.resume_from) if attempt.resume_from else None,
            started_at=attempt.started_at,
        )

    # following ------------------------------------------------------------
    def start_pump(self) -> None:
        self.wakeups.open_watch()
        self.wakeups.changed(set(self.runners))  # a first read of every job
        self.bus.add_listener(self._on_event)
        self._keep_spares()
        self._pump_task = asyncio.create_task(self._pump_forever(), name="pump")

    def _keep_spares(self) -> None:
        """Replace used or lost spares, but never beside an attempt's start-up."""
        now = time.time()
        try:
            self.spares.keep(not any(r.starting_up(now) for r in self.runners.values()))
        except Exception:
            log.exception("keeping the spare standbys failed")

    def _on_event(self, event: dict[str, Any]) -> None:
        """A job's own event (submitted, attempt started, state) may mean new files
        to watch or read; the pump's own progress and log events do not."""
        job = event.get("job")
        if job in self.runners and event.get("kind") not in STREAM_ONLY_KINDS:
            self.wakeups.changed({str(job)})

    def _needs_polling(self, runner: JobRunner) -> bool:
        """A running attempt (hang checks, the trainer's files in the output folder,
        which are not watched), a read of those files still to pick up, or a warm
        standby (ready or lost: its folder is not watched either), or a discarded
        one not yet gone."""
        return (
            runner.attempt is not None
            or runner.follower.reads_pending
            or runner.standbys.current is not None
            or runner.standbys.discarding
        )

    async def _pump_forever(self) -> None:
        wakeups = self.wakeups
        last_slow = time.monotonic()
        while True:
            if wakeups.polling:
                timeout: float | None = FALLBACK_POLL_S
            elif self.spares.unsettled or any(
                self._needs_polling(r) for r in self.runners.values()
            ):
                timeout = max(0.0, last_slow + SLOW_PASS_S - time.monotonic())
            else:
                timeout = None  # nothing changes unless an event says so: sleep
            await wakeups.wait(timeout)
            due = wakeups.take()
            now = time.monotonic()
            if wakeups.polling:
                due = set(self.runners)
            elif now - last_slow >= SLOW_PASS_S:
                last_slow = now
                due |= {n for n, r in self.runners.items() if self._needs_polling(r)}
                if not due:  # no job to read: the spares alone (a pass reads them too)
                    self._keep_spares()
            if due:
                self._pump_pass(due)
                await asyncio.sleep(PUMP_INTERVAL)

    def _pump_pass(self, names: set[str]) -> None:
        self.wakeups.passes += 1
        self._keep_spares()
        for name in names:
            runner = self.runners.get(name)
            if runner is None:
                continue
            self.wakeups.reads += 1
            try:
                self._watch_folders(runner)
                runner.pump()
                runner.check_hang()
            except Exception:
                log.exception("job %s: reading progress failed", runner.name)

    def _watch_folders(self, runner: JobRunner) -> None:
        """The job's run folder (progress.jsonl) and its attempt's (the output log)."""
        watch = self.wakeups.watch
        if watch is None:
            return
        wanted = {self.layout.run_dir(runner.name)}
        if runner.attempt is not None:
            wanted.add(runner.attempt.attempt_dir)
        have = watch.watching(runner.name)
        for folder in have - wanted:
            watch.unwatch(runner.name, folder)
        try:
            for folder in wanted - have:
                watch.watch(runner.name, folder)
        except InotifyUnavailable as exc:
            if exc.errno in (errno.ENOSPC, errno.EMFILE, errno.ENOMEM):
                self.wakeups.fall_back(str(exc))  # out of watches: poll every job
            # ENOENT: not made yet; its creation in the run folder wakes the pump again

    async def close(self) -> None:
        """Stop supervising (the daemon exits); the runs themselves keep going."""
        tasks = [r.task for r in self.runners.values() if r.task is not None]
        if self._pump_task is not None:
            tasks.append(self._pump_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.spares.discard()  # they would die with the daemon anyway: say so now
        self.wakeups.close()

    def get(self, name: str) -> JobRunner:
        runner = self.runners.get(name)
        if runner is None:
            if self.store.get_job(name) is None:
                raise RequestError("not_found", f"no job named {name!r} (see `ftsup ls`)")
            raise RequestError("not_running", f"job {name!r} is not running")
        return runner

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for job in self.store.jobs():
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts
