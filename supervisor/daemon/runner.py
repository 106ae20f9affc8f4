r"""One job's lifecycle: launch an attempt, wait for it, judge the exit, restart.

    pending -> starting -> running -> (exit) -> backoff -> starting -> ...
                                   \-> finished | stopped | gave_up | failed

The runner owns no process: the shim does. Everything the runner needs after a
daemon restart is in the store and in the attempt folder, so a new runner can
pick up an attempt that an earlier daemon launched (`adopt`). What the trainer
is doing is read by the `RunFollower`; the runner decides and acts: restarts,
stops, hang kills, loss-anomaly rollbacks, drift refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftsup.supervisor import policy
from ftsup.supervisor.atomicio import read_json, tail_lines, write_json_atomic
from ftsup.supervisor.checkpoints.drift_guard import (
    diff_fingerprints,
    drift_refused,
    elastic_resize,
    elastic_summary,
)
from ftsup.supervisor.contract import (
    ENV_MEMORY_LINEAGE,
    ENV_SKIP_STEPS,
    EXIT_CONFIG,
    EXIT_FILE,
    LOG_FILE,
)
from ftsup.supervisor.daemon.attempt import KILL_FILE, LiveAttempt, wait_until_gone
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.exitwatch import wait_for_exit
from ftsup.supervisor.daemon.follower import RunFollower
from ftsup.supervisor.daemon.job_checkpoints import JobCheckpoints
from ftsup.supervisor.daemon.launcher import (
    TRANSIENT_ERRNOS,
    AttemptPlan,
    is_elastic,
    plan_attempt,
    spawn_shim,
)
from ftsup.supervisor.daemon.launcher import (
    job_fingerprint as launcher_fingerprint,
)
from ftsup.supervisor.daemon.nodes_view import NodesView, node_name
from ftsup.supervisor.daemon.placement import Placement
from ftsup.supervisor.daemon.standby import Standby, StandbyKeeper, WarmPool, take_warm
from ftsup.supervisor.goodput import checkpoint_advice
from ftsup.supervisor.health.diagnosis import KILLED_BY_HANG
from ftsup.supervisor.health.loss import Anomaly
from ftsup.supervisor.health.stacks import capture_stacks
from ftsup.supervisor.instrumentation import Instrumentation
from ftsup.supervisor.manifest import ManifestError, read_manifest
from ftsup.supervisor.memory_tier import (
    current_lineage,
    discard,
    memory_dir,
    memory_every,
    new_lineage,
    newest_usable,
)
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.procinfo import ProcessUnreadable, is_same_process, process_start_time
from ftsup.supervisor.progress import ProgressState
from ftsup.supervisor.protocol import EventKind, JobState
from ftsup.supervisor.resume import CheckpointsUncheckable, ResumePoint
from ftsup.supervisor.spec_types import JobSpec
from ftsup.supervisor.store import AttemptRow, JobRow, Store, ended_outcomes

log = logging.getLogger("ftsup.daemon")

SKIP_FILE = "skip_steps.json"  # data windows skipped after loss anomalies, [[from, to], ...]
KILLED_BY_LOSS = "ftsup-loss-anomaly"

ResumeSelector = Callable[[JobSpec], ResumePoint]
# ("ok" | "wait" | "fail", why): may an attempt be launched now (GPUs present and healthy)?
Preflight = Callable[[JobSpec], tuple[str, str]]
PREFLIGHT_RETRY = 5.0
MEMORY_RETRY = 2.0  # while another process's memory is on the job's GPUs
MEMORY_LOOK_TIMEOUT_S = 10.0  # a launch waits this long for the memory snapshots' check
NODES_REFRESH_TIMEOUT_S = 5.0  # a decision waits this long for the other nodes' records
STARTUP_S = 120.0  # an attempt with no step after this long no longer holds back spares
Classifier = Callable[[dict[str, Any], list[str], LiveAttempt], tuple[str | None, str]]


class JobRunner:
    def __init__(
        self,
        spec: JobSpec,
        *,
        store: Store,
        bus: EventBus,
        layout: Layout,
        select_resume: ResumeSelector,
        classify: Classifier,
        env: dict[str, str],
        preflight: Preflight | None = None,
        placement: Placement | None = None,
        spares: WarmPool | None = None,
    ) -> None:
        self.spec = spec
        self._spares = spares  # the daemon's spare standbys (spares.py), shared by its jobs
        self._placement = placement
        self.gpus: tuple[int, ...] | None = None  # the GPUs the queue gave this job
        self.store = store
        self.bus = bus
        self.layout = layout
        self._select_resume = select_resume
        self._classify = classify
        self._preflight = preflight
        self._env = env
        self.checkpoints = JobCheckpoints(spec, store, bus, on_disk_pause=self.pause_for_disk)
        self.standbys = StandbyKeeper(
            spec,
            layout.run_dir(spec.name),
            lambda kind, message, data: self.bus.emit(self.name, kind, message, data),
        )
        self.follower = RunFollower(
            spec,
            layout.progress_file(spec.name),
            lambda kind, message, data: self.bus.emit(self.name, kind, message, data),
        )
        self.instrumentation = Instrumentation.for_spec(spec)
        # A multi-node job: every node's part, through the shared output folder.
        self.nodes = (
            NodesView(spec.output_dir, node_name(layout.state_dir))
            if spec.launch.nnodes > 1
            else None
        )
        # The memory tier (issue 18): its folder when on, and the lineage token
        # the attempts write their snapshots under (read before each launch).
        self._memory = memory_dir(spec, layout) if memory_every(spec) else None
        self._lineage: str | None = None
        self._node_state = "submitted"
        self._node_reason: str | None = None
        self._node_counts: dict[str, int] = {"failures": 0, "stalled": 0}
        self._supervising_since = time.time()  # other nodes' older records are another run's
        self.attempt: LiveAttempt | None = None
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.stop_requested = False
        self.restart_requested = False
        # The graceful stop under way is a trip back to the queue (a preemption, an
        # elastic job's regrowth), not the end of the job.
        self._requeued = False
        self._stop_reason: str | None = None
        # Set when the attempt must end (stop, restart, hang): the shim acts on its
        # SIGTERM; when the shim is gone, the runner stops the trainer itself.
        self._terminate = asyncio.Event()
        self._last_stored_step = -1
        self._hang_handled = False
        self._hang_task: asyncio.Task[None] | None = None
        self._anomaly_handled = False
        self._rollback_from: int | None = None
        self.skip_windows: list[tuple[int, int]] = _read_skip_windows(
            layout.run_dir(spec.name) / SKIP_FILE
        )
        self._refresh_attempt_starts()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def devices(self) -> tuple[int, ...] | None:
        """The GPUs the job runs on: the queue's allocation, else the ones it names."""
        return self.gpus if self.gpus is not None else self.spec.gpu.devices

    @property
    def progress(self) -> ProgressState:
        return self.follower.progress

    # lifecycle ------------------------------------------------------------
    def start(
        self, *, adopt: LiveAttempt | None = None, delay: float = 0.0, judge_last: bool = False
    ) -> None:
        """Supervise: adopt a live attempt, or launch one (after `delay`); with
        `judge_last`, first judge the last attempt, which ended while no daemon
        was there to (an earlier daemon died between its exit and the verdict)."""
        self.task = asyncio.create_task(
            self._run(adopt, delay, judge_last), name=f"job:{self.name}"
        )

    async def _run(self, adopt: LiveAttempt | None, delay: float, judge_last: bool) -> None:
        self.checkpoints.start()
        try:
            if delay > 0 and not await self._sleep(delay):
                return self._finish("stopped", "stopped on request while waiting to restart")
            attempt = adopt
            while True:
                last = self.store.last_attempt(self.name) if judge_last else None
                judge_last = False
                if last is not None and last.ended_at is not None:
                    row = last  # its verdict was never given: give it now, launch nothing yet
                else:
                    if attempt is None:
                        if self.stop_requested:
                            return self._finish("stopped", "stopped on request")
                        attempt = await self._launch()
                        if attempt is None:
                            return
                    row = await self._wait(attempt)
                    attempt = None
                decision = await self._judge()
                if isinstance(decision, policy.Stopped) and self._requeued:
                    self._back_to_queue()
                    continue
                if isinstance(decision, policy.Stopped) and self.restart_requested:
                    self.stop_requested = self.restart_requested = False
                    self.store.reset_first_attempt(self.name)
                    self.bus.emit(self.name, "restart", "restarting on request")
                    continue
                if isinstance(decision, policy.Restart):
                    self.bus.emit(
                        self.name,
                        "restart",
                        decision.reason,
                        {"after": decision.after, "attempt": row.n},
                    )
                    if not await self._backoff(decision.after, decision.reason):
                        return self._finish("stopped", "stopped on request while waiting")
                    continue
                self._conclude(decision, row)
                return
        except asyncio.CancelledError:
            raise  # the daemon is shutting down: the run itself is left alone
        except Exception as exc:
            log.exception("job %s: supervision failed", self.name)
            self._finish("failed", f"internal error in the supervisor: {exc!r}")
        finally:
            self.checkpoints.stop()
            self.standbys.discard()

    def request_preempt(self, for_job: str) -> None:
        """A higher-priority job needs this job's GPUs: stop gracefully (the trainer
        saves and exits 75), give the GPUs back, and wait in the queue again."""
        message = f"preempted for {for_job}: saving, then back to the queue"
        self._requeue(EventKind.PREEMPTED, message, {"for": for_job})

    def request_regrow(self, why: str) -> None:
        """An elastic job on fewer GPUs than it asked for: GPUs are back, so save,
        and go through the queue again, which places it on the full count."""
        self._requeue(
            EventKind.RESTART, f"{why}: saving, then restarting on them", {"regrow": True}
        )

    def _requeue(self, kind: str, message: str, data: dict[str, object]) -> None:
        if self._requeued or self.attempt is None or self.stop_requested:
            return
        self.bus.emit(self.name, kind, message, data)
        self.request_stop(now=False)
        self._requeued = True  # after request_stop, which clears it (a user's stop)

    def _back_to_queue(self) -> None:
        """After a preemption's graceful stop: not `stopped`, queued again, to resume
        later from the checkpoint it just saved."""
        self._requeued = False
        self.stop_requested = False
        self.gpus = None
        if self._placement is not None:
            self._placement.release(self.name)

    def _conclude(self, decision: policy.Decision, row: AttemptRow) -> None:
        if isinstance(decision, policy.Done):
            self._finish("finished", decision.reason)
        elif isinstance(decision, policy.Stopped):
            self._finish("stopped", self._stop_reason or decision.reason)
        else:
            state = "failed" if row.returncode == EXIT_CONFIG else "gave_up"
            tail = _tail(self.layout.attempt_dir(self.name, row.n) / LOG_FILE, 15)
            reason = (
                f"{decision.reason}; last attempt: {row.reason}" if row.reason else decision.reason
            )
            self._finish(state, reason, {"log_tail": tail})

    def _write_own(self, path: Path, data: Any) -> bool:
        """A file of the runner's own (kill.json, skip_steps.json). A full or failing
        disk must not end supervision: the failure is logged and reported as a
        `warning` event, and the caller goes on with what it knows in memory."""
        try:
            write_json_atomic(path, data)
        except OSError as exc:
            log.warning("job %s: cannot write %s: %s", self.name, path, exc)
            with contextlib.suppress(Exception):
                self.bus.emit(
                    self.name,
                    "warning",
                    f"cannot write {path.name}: {exc.strerror or exc}",
                    {"path": str(path), "errno": exc.errno},
                )
            return False
        return True

    def _finish(self, state: str, reason: str, data: dict[str, Any] | None = None) -> None:
        """Record the end of supervision. Never raises: it is also the last step of
        `_run`'s error path, and an exception here would end the job task silently."""
        try:
            self.store.set_job_state(self.name, state, reason)
        except Exception:
            log.exception("job %s: cannot record state %s (%s)", self.name, state, reason)
        self._node_reason = reason
        self.report_node(state, force=True)
        if self._memory is not None and state != JobState.STOPPED:
            discard(self._memory)  # a stopped job may be restarted: its snapshot stays
        if self._placement is not None:
            try:
                self._placement.release(self.name)  # after the state: successors read it
            except Exception:
                log.exception("job %s: cannot give its GPUs back", self.name)
        for kind, message, payload in (
            (state, reason, data),
            ("state", state, {"state": state, "reason": reason}),
        ):
            try:
                self.bus.emit(self.name, kind, message, payload)
            except Exception:
                log.exception("job %s: cannot emit %s event", self.name, kind)

    def _set_state(
        self, state: str, reason: str | None = None, next_start_at: float | None = None
    ) -> None:
        self.store.set_job_state(self.name, state, reason, next_start_at)
        self.bus.emit(self.name, "state", state, {"state": state, "reason": reason})
        self.report_node(state, force=True)

    def report_node(self, state: str | None = None, *, force: bool = False) -> None:
        """A multi-node job: this node's record in the shared folder, and the other
        nodes' read back (in a thread, at most every few seconds unless `force`)."""
        if self.nodes is None:
            return
        if state is not None:
            self._node_state = state
        self.nodes.refresh(self._node_record(), force=force)

    def _node_record(self) -> dict[str, Any]:
        progress = self.follower.progress.to_json()
        return {
            "job": self.name,
            "state": self._node_state,
            "reason": self._node_reason,
            "step": progress.get("step"),
            "attempt": self.attempt.n if self.attempt is not None else None,
            "waiting_for_nodes": self.follower.waiting_for_nodes,
            **self._node_counts,
        }

    async def _judge(self) -> policy.Decision:
        """The restart policy's verdict on the attempt that just ended. A multi-node
        job's limits are the job's: its failures are counted with the other nodes'
        (read afresh), and when another node of the run gave up, this one does too
        (its launcher would wait for that node for ever)."""
        history = self.history()
        if self.nodes is None:
            return policy.decide(history, self.spec.restart)
        self._node_counts = {
            "failures": policy.failure_restarts(history),
            "stalled": policy.consecutive_failures_without_progress(history),
        }
        await self.nodes.refresh_now(self._node_record(), NODES_REFRESH_TIMEOUT_S)
        since = self._supervising_since
        others = self.nodes.other_counts(self.name, since)
        decision = policy.decide(history, self.spec.restart, others)
        ended = self.nodes.gave_up_elsewhere(self.name, since)
        if isinstance(decision, policy.Restart) and ended is not None:
            why = ended.get("reason") or ended.get("state")
            return policy.GiveUp(f"node {ended.get('host')} ({ended['node']}) gave up: {why}")
        return decision

    async def _backoff(self, seconds: float, reason: str) -> bool:
        self._set_state("backoff", reason, time.time() + seconds)
        return await self._sleep(seconds)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless a stop request comes first (then False)."""
        if self.stop_requested:
            return False
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        return not self.stop_requested

    def history(self) -> list[policy.AttemptOutcome]:
        return ended_outcomes(self.store.current_attempts(self.name))

    # one attempt ----------------------------------------------------------
    async def _launch(self) -> LiveAttempt | None:
        if not await self._wait_for_gpus():
            return None
        if not await self._wait_until_launchable():
            return None
        if not await self._wait_for_gpu_memory():
            return None
        self._set_state("starting")
        await asyncio.to_thread(self._set_aside_after_rollback)
        resume = await self._select_when_checkable()
        if resume is None:
            return None
        if self.restart_requested:  # asked while the checkpoints were checked: this is it
            self.stop_requested = self.restart_requested = False
        elif self.stop_requested:
            self._finish("stopped", "stopped on request while waiting to launch")
            return None
        for path, reason in resume.quarantined:
            self.bus.emit(
                self.name,
                "quarantine",
                f"{path.name}: {reason}",
                {"path": str(path), "reason": reason},
            )
        if resume.path is not None and not self._drift_allowed(resume.path):
            return None
        if self._memory is not None:
            resume = await self._prefer_memory(resume)
        if resume.path is None and resume.quarantined and not self.spec.checkpoint.allow_scratch:
            self._finish(
                "gave_up",
                "no valid checkpoint left to resume from and [checkpoint] allow_scratch = false",
            )
            return None
        n = self.store.next_attempt_number(self.name)
        now = time.time()
        self.store.add_attempt(
            job=self.name,
            n=n,
            started_at=now,
            resume_from=str(resume.path) if resume.path else None,
            start_step=resume.step,
        )
        started = await self._start_shim(n, resume.path)
        if started is None:
            return None
        child, plan, warm = started
        how = "" if warm is None else " (the daemon's spare)" if warm.spare else " (warm standby)"
        attempt_dir = self.layout.attempt_dir(self.name, n)
        attempt = LiveAttempt(
            n=n,
            attempt_dir=attempt_dir,
            shim_pid=child.pid,
            shim_start=await _start_time_of(child.pid),
            start_step=resume.step,
            resume_from=resume.path,
            started_at=now,
            child=child,
        )
        self.store.update_attempt(
            self.name, n, shim_pid=attempt.shim_pid, shim_start=attempt.shim_start
        )
        self._set_state("running")
        where = f"from {resume.path.name}" if resume.path else "from scratch"
        self.bus.emit(
            self.name,
            "attempt_started",
            f"attempt {n} started {where}{how}",
            {
                "attempt": n,
                "resume_from": str(resume.path) if resume.path else None,
                "start_step": resume.step,
                "argv": plan.argv,
                "standby": warm is not None,
                "spare": warm is not None and warm.spare,
            },
        )
        self._begin_attempt(attempt)
        return attempt

    async def _start_shim(
        self, n: int, resume_from: Path | None
    ) -> tuple[subprocess.Popen[bytes], AttemptPlan, Standby | None] | None:
        """Attempt `n`'s shim, started: (shim, plan, the warm standby it is, or None).

        A disk that is full or failing for now, or exhausted descriptors or memory,
        make the launch wait and try again: none of them is a reason to end the job.
        None: the job ended instead (it cannot be launched, or was stopped meanwhile).
        """
        attempt_dir = self.layout.attempt_dir(self.name, n)
        while True:
            try:
                plan = self._plan(n, resume_from)
                warm = await self._activate_standby(plan, n, attempt_dir)
                if warm is not None:
                    return warm.shim, plan, warm
                return spawn_shim(self.spec, self.layout, attempt=n, plan=plan), plan, None
            except ValueError as exc:  # a launch the trainer cannot do (multi-node, no endpoint)
                self.store.update_attempt(self.name, n, ended_at=time.time(), reason=str(exc))
                self._finish("failed", f"cannot launch: {exc}")
                return None
            except OSError as exc:
                if exc.errno not in TRANSIENT_ERRNOS:
                    self.store.update_attempt(self.name, n, ended_at=time.time(), reason=str(exc))
                    self._finish("failed", f"cannot start the shim: {exc}")
                    return None
                why = f"cannot start attempt {n} ({exc.strerror or exc}); trying again"
                log.warning("job %s: %s", self.name, why)
                self.bus.emit(self.name, "launch_wait", why, {"errno": exc.errno})
                if not await self._backoff(PREFLIGHT_RETRY, why):
                    self.store.update_attempt(
                        self.name,
                        n,
                        ended_at=time.time(),
                        stop_requested=True,
                        reason="stopped before its shim started",
                    )
                    self._finish("stopped", "stopped on request while waiting to launch")
                    return None
                self._set_state("starting")

    async def _select_when_checkable(self) -> ResumePoint | None:
        """The checkpoint to resume from, once the checkpoints can be read.

        "Could not check" (EMFILE, EIO, ...) is not "corrupt": launching from an older
        checkpoint or from scratch would throw away training, so the launch waits
        with a `launch_wait` event and tries again. None: stopped while waiting.
        """
        while True:
            try:
                return await asyncio.to_thread(self._select_resume, self.spec)
            except CheckpointsUncheckable as exc:
                why = f"checkpoints could not be checked ({exc.reason}); trying again"
                self.bus.emit(self.name, "launch_wait", why, {"reason": exc.reason})
                if not await self._backoff(PREFLIGHT_RETRY, why):
                    self._finish("stopped", "stopped on request while waiting to launch")
                    return None
                self._set_state("starting")

    async def _prefer_memory(self, disk: ResumePoint) -> ResumePoint:
        """The memory snapshot instead of `disk` when one is usable and newer
        (`memory_tier.newest_usable`); looked at in a thread, with a deadline."""
        assert self._memory is not None
        run_dir = self.layout.run_dir(self.name)
        try:
            if self._lineage is None:  # this daemon's token, once read, is the one in force
                self._lineage = await asyncio.to_thread(current_lineage, run_dir)
            snapshot = await asyncio.wait_for(
                asyncio.to_thread(
                    newest_usable,
                    self._memory,
                    job=self.name,
                    lineage=self._lineage,
                    fingerprint=launcher_fingerprint(self.spec, self.gpus),
                    newer_than=disk.step if disk.path is not None else -1,
                ),
                MEMORY_LOOK_TIMEOUT_S,
            )
        except (TimeoutError, OSError) as exc:
            log.warning("job %s: memory snapshots not looked at: %s", self.name, exc)
            return disk
        if snapshot is None:
            return disk
        newest = disk.path.name if disk.path is not None else "none"
        self.bus.emit(
            self.name,
            EventKind.MEMORY_RESUME,
            f"resuming the memory snapshot of step {snapshot.step} "
            f"(newest disk checkpoint: {newest})",
            {
                "path": str(snapshot.path),
                "step": snapshot.step,
                "disk_step": disk.step if disk.path is not None else None,
                "bytes": snapshot.size_bytes,
                "written_by_attempt": snapshot.attempt,
            },
        )
        return ResumePoint(snapshot.path, snapshot.step, disk.quarantined)

    def _plan(self, attempt: int, resume_from: Path | None) -> AttemptPlan:
        env = dict(self._env)
        if self._memory is not None and self._lineage is not None:
            env[ENV_MEMORY_LINEAGE] = self._lineage
        if self.skip_windows:  # the data a loss anomaly rolled back past
            env[ENV_SKIP_STEPS] = ",".join(f"{a}-{b}" for a, b in self.skip_windows)
        return plan_attempt(
            self.spec,
            self.layout,
            attempt=attempt,
            resume_from=resume_from,
            base_env=env,
            devices=self.gpus,
        )

    async def _activate_standby(
        self, plan: AttemptPlan, n: int, attempt_dir: Path
    ) -> Standby | None:
        """The warm standby now running attempt `n`; None: start cold."""
        found = self._take_warm(plan)
        if found is None:
            return None
        pool, standby = found
        if not attempt_dir.exists() and await asyncio.to_thread(
            standby.activate, attempt_dir, n, self.spec, plan
        ):
            return standby
        pool.discard_taken(standby)
        return None

    def _take_warm(self, plan: AttemptPlan) -> tuple[WarmPool, Standby] | None:
        """The job's own standby or one of the daemon's spares (`take_warm`); spares
        only for jobs that may have a standby at all."""
        pools: list[WarmPool] = [self.standbys]
        if self._spares is not None and self.standbys.enabled:
            pools.append(self._spares)
        return take_warm(pools, plan)

    def _keep_standby_warm(self) -> None:
        """A standby waits for the next restart once the attempt has stepped."""
        attempt = self.attempt
        start_one = attempt is not None and not self.stop_requested and self._has_stepped(attempt)
        self.standbys.keep_warm(lambda: self._plan(0, None), start_one)

    def _has_stepped(self, attempt: LiveAttempt) -> bool:
        return self.follower.progress.attempt_max_step > attempt.start_step

    def starting_up(self, now: float) -> bool:
        """An attempt is in its start-up: launched, no step yet, and not for long
        (a command that never reports steps is not starting for ever)."""
        attempt = self.attempt
        return (
            attempt is not None
            and not self._has_stepped(attempt)
            and now - attempt.started_at < STARTUP_S
        )

    async def _wait_for_gpus(self) -> bool:
        """Through the GPU queue (jobs that ask for GPUs or run after others); the
        job shows `queued` or `blocked` with the reason while it waits."""
        if self._placement is None:
            return True
        gpus = await self._placement.acquire(
            self.spec, self._set_state, lambda: self.stop_requested, self._wake
        )
        if gpus is None:
            self._finish("stopped", "stopped on request while queued")
            return False
        self.gpus = gpus or None
        return True

    def _preflight_checks(self) -> tuple[str, str]:
        """The first pre-launch check that is not ok (GPUs, then disk space), else ok."""
        if self._preflight is not None:
            verdict = self._preflight(self.spec)
            if verdict[0] != "ok":
                return verdict
        return self.checkpoints.preflight()

    async def _wait_until_launchable(self) -> bool:
        """A job whose GPUs are unhealthy, or whose disk is full, waits; it never crashes."""
        while True:
            verdict, why = self._preflight_checks()
            if verdict == "ok":
                return True
            if verdict == "fail":
                self._finish("failed", why)
                return False
            self.bus.emit(self.name, "launch_wait", why)
            if not await self._backoff(PREFLIGHT_RETRY, why):
                self._finish("stopped", "stopped on request while waiting to launch")
                return False

    async def _wait_for_gpu_memory(self) -> bool:
        """Launch only on GPUs where processes that are not this job's running
        trainer hold no more than the limit: the dying run's own memory (its
        processes may outlive the exit by seconds) and another user's process."""
        why = None
        while self._placement is not None and self.gpus:
            held = await self._placement.foreign_on(self.gpus)
            if not held:
                return True
            now_why = "waiting for GPU memory held by processes that are not this job's: "
            now_why += ", ".join(f"GPU {i} {mib / 1024:.1f} GiB" for i, mib in sorted(held.items()))
            if now_why != why:
                why = now_why
                held_mib = {str(i): mib for i, mib in held.items()}
                self.bus.emit(self.name, EventKind.LAUNCH_WAIT, why, {"held_mib": held_mib})
                self._set_state(JobState.QUEUED, why)
            if not await self._sleep(MEMORY_RETRY):
                self._finish("stopped", "stopped on request while waiting for GPU memory")
                return False
        return True

    def _drift_allowed(self, checkpoint: Path) -> bool:
        """Refuse a resume whose data order or optimizer state would silently change."""
        if self.spec.train is None:
            return True  # a command's configuration is opaque to ftsup
        try:
            recorded = read_manifest(checkpoint).fingerprint
        except ManifestError:
            return True  # no fingerprint to compare (validation decided it is resumable)
        elastic = is_elastic(self.spec)
        job_fingerprint = launcher_fingerprint(self.spec, self.gpus)
        drifts = diff_fingerprints(recorded, job_fingerprint)
        if not drifts:
            return True
        resized = elastic_summary(recorded, job_fingerprint) if elastic else None
        sizes = elastic_resize(recorded, job_fingerprint)
        if resized is not None and sizes is not None and all(d.elastic for d in drifts):
            data = {"checkpoint": checkpoint.name, "world_size": list(sizes), "summary": resized}
            self.bus.emit(
                self.name, EventKind.RESIZED, f"resuming {checkpoint.name}: {resized}", data
            )
            return True
        changes = "; ".join(d.message for d in drifts)
        job = self.store.get_job(self.name)
        if not drift_refused(drifts) or (job is not None and job.accept_drift):
            self.bus.emit(
                self.name,
                "drift",
                f"resuming {checkpoint.name} although {changes}",
                {"changes": [d.message for d in drifts]},
            )
            return True
        self._finish(
            "failed",
            f"refusing to resume from {checkpoint.name}: {changes}. "
            "Undo the change, or start the job with `ftsup start --accept-drift` "
            "to resume anyway.",
        )
        return False

    def _begin_attempt(self, attempt: LiveAttempt) -> None:
        self.attempt = attempt
        self._refresh_attempt_starts()
        self.follower.begin_attempt(
            attempt.attempt_dir, attempt.started_at, attempt.start_step, LOG_FILE
        )
        self.instrumentation.begin_attempt()
        self._anomaly_handled = False
        self._hang_handled = False
        self._terminate.clear()

    async def _wait(self, attempt: LiveAttempt) -> AttemptRow:
        await wait_for_exit(attempt.shim_pid, attempt.shim_start, attempt.child)
        exit_info = _read_record(attempt.attempt_dir / EXIT_FILE)
        if exit_info is None:
            exit_info = await self._wait_orphaned_trainer(attempt)
        exit_info.update(_read_record(attempt.attempt_dir / KILL_FILE) or {})
        await self.follower.settle()
        self.pump()  # the last progress and log lines before judging
        pids = attempt.pids()
        last_step = max(attempt.start_step, self.follower.progress.attempt_max_step)
        self.follower.end_attempt()
        log_tail = _tail(attempt.attempt_dir / LOG_FILE, 40)
        kind, reason = self._classify(exit_info, log_tail, attempt)
        stop_requested = bool(exit_info.get("stop_requested")) or self.stop_requested
        fields: dict[str, Any] = dict(
            ended_at=exit_info.get("ended_at", time.time()),
            returncode=exit_info.get("returncode"),
            signal=exit_info.get("signal"),
            stop_requested=stop_requested,
            last_step=last_step,
            failure_kind=kind,
            reason=reason,
        )
        if pids:
            fields.update(
                trainer_pid=pids.get("trainer_pid"), trainer_start=pids.get("trainer_start")
            )
        self.store.update_attempt(self.name, attempt.n, **fields)
        self.attempt = None
        await self.checkpoints.sweep()
        self.bus.emit(
            self.name,
            "attempt_exited",
            f"attempt {attempt.n}: {reason}",
            {
                "attempt": attempt.n,
                "returncode": fields["returncode"],
                "signal": fields["signal"],
                "failure_kind": kind,
                "last_step": last_step,
                "start_step": attempt.start_step,
            },
        )
        row = self.store.last_attempt(self.name)
        assert row is not None
        return row

    async def _wait_orphaned_trainer(self, attempt: LiveAttempt) -> dict[str, Any]:
        """The shim died without writing exit.json (it was killed): wait for its trainer,
        and do what the shim would have done with it (stop it on request, then clear
        its process group)."""
        trainer = attempt.trainer()
        if trainer is not None and is_same_process(*trainer):
            self.bus.emit(
                self.name,
                "warning",
                f"attempt {attempt.n}: shim lost; following the trainer directly",
            )
            await self._follow_orphan(attempt, *trainer)
        # Anything left in the group (dataloader workers, torchrun children) goes too.
        attempt.signal_trainer(signal.SIGKILL)
        return {
            "returncode": None,
            "signal": None,
            "error": "shim_lost",
            "message": "the shim died; the trainer's exit status is unknown",
        }

    async def _follow_orphan(self, attempt: LiveAttempt, pid: int, start: int | None) -> None:
        """Wait for a trainer whose shim is gone. A stop (or hang kill) is carried out
        here as the shim would: SIGTERM to the group, SIGKILL after `stop_grace`."""
        gone = asyncio.ensure_future(wait_until_gone(pid, start))
        terminate = asyncio.ensure_future(self._terminate.wait())
        try:
            await asyncio.wait({gone, terminate}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                return
            grace = self.spec.restart.stop_grace
            self.bus.emit(
                self.name,
                "warning",
                f"attempt {attempt.n}: no shim to stop the trainer; sending SIGTERM "
                f"to its process group, SIGKILL after {grace:g}s",
            )
            attempt.signal_trainer(signal.SIGTERM)
            await asyncio.wait({gone}, timeout=grace)
            if not gone.done():
                attempt.signal_trainer(signal.SIGKILL)
                await asyncio.wait({gone})
        finally:
            gone.cancel()
            terminate.cancel()

    # requests -------------------------------------------------------------
    def request_stop(self, *, now: bool) -> None:
        self._requeued = False  # a stop ends the job, even one being preempted
        self.stop_requested = True
        self._wake.set()
        attempt = self.attempt
        if attempt is None:
            return
        self.store.update_attempt(self.name, attempt.n, stop_requested=True)
        self.standbys.discard()
        self._set_state("stopping", "kill requested" if now else "graceful stop requested")
        if now:
            self.signal_trainer(signal.SIGKILL)
        self._end_attempt(attempt)

    def _end_attempt(self, attempt: LiveAttempt) -> None:
        """SIGTERM to the shim (it forwards, waits stop_grace, escalates). Should the
        shim be gone, `_follow_orphan` does the same itself on `_terminate`."""
        self._terminate.set()
        attempt.signal_shim(signal.SIGTERM)

    def pause_for_disk(self, reason: str) -> None:
        """Ask the trainer to save and exit (75) without a stop request: the next
        launch then waits in its pre-launch check until disk space returns."""
        self.signal_trainer(signal.SIGTERM)

    def wake(self) -> None:
        """End a wait early (its condition may have changed); stop flags are kept."""
        self._wake.set()

    def request_restart(self) -> None:
        self.restart_requested = True
        self.request_stop(now=False)

    def request_save(self) -> bool:
        """SIGUSR2 to the instrumented process alone when it is known: a launcher
        above it (`accelerate launch`) would die of the signal's default action. Its
        ranks agree on the save at the next step, so rank 0 is enough."""
        if self.attempt is None:
            return False
        pid = self.instrumentation.pid
        if pid is not None:
            return self.attempt.signal_process(pid, signal.SIGUSR2)
        return self.attempt.signal_trainer(signal.SIGUSR2)

    def signal_trainer(self, sig: signal.Signals) -> bool:
        """Send `sig` to the trainer's whole process group (checked by start time)."""
        return self.attempt.signal_trainer(sig) if self.attempt is not None else False

    # following ------------------------------------------------------------
    def pump(self) -> None:
        """Read what the trainer wrote since the last call and act on it."""
        seen = self.follower.read()
        for step in seen.saved_steps:
            self.checkpoints.after_save(step)
        if seen.records:
            self._observe_instrumentation(seen.records)
            self.bus.emit(self.name, "progress", "", self.follower.progress.to_json())
            self._store_step()
            self.report_node()
        if seen.anomaly is not None:
            self._on_loss_anomaly(seen.anomaly)
        if seen.log_lines and self.bus.has_subscribers("log"):
            attempt = self.attempt.n if self.attempt else None
            self.bus.emit(self.name, "log", "", {"lines": seen.log_lines, "attempt": attempt})
        self._keep_standby_warm()

    def _store_step(self) -> None:
        attempt = self.attempt
        reached = self.follower.progress.attempt_max_step
        if attempt is not None and reached != self._last_stored_step:
            self._last_stored_step = reached
            self.store.update_attempt(
                self.name, attempt.n, last_step=max(reached, attempt.start_step)
            )

    def _refresh_attempt_starts(self) -> None:
        self.follower.goodput.set_attempt_starts(
            [a.started_at for a in self.store.current_attempts(self.name)]
        )

    def goodput_report(
        self, job: JobRow | None = None, attempts: list[AttemptRow] | None = None
    ) -> dict[str, Any] | None:
        """Wall time split into productive, stall, recomputed and downtime, plus advice.
        `job`, `attempts`: the job's row and current attempts when the caller has them."""
        job = job if job is not None else self.store.get_job(self.name)
        attempts = attempts if attempts is not None else self.store.current_attempts(self.name)
        if job is None or not attempts:
            return None
        until = time.time() if job.live else max(a.ended_at or a.started_at for a in attempts)
        report = self.follower.goodput.report(attempts[0].started_at, until)
        failures = policy.failure_restarts(ended_outcomes(attempts))
        configured = self.spec.train.save_steps if self.spec.train else None
        advice = checkpoint_advice(
            self.follower.goodput,
            wall_s=report.wall_s,
            failures=failures,
            configured_steps=configured,
        )
        return {**report.to_json(), "checkpoint_advice": advice}

    # interventions ------------------------------------------------------
    def _on_loss_anomaly(self, anomaly: Anomaly) -> None:
        """`[health] loss_anomaly`: warn, stop, or roll back past the bad data."""
        attempt, action = self.attempt, self.spec.health.loss_anomaly
        if attempt is None or self._anomaly_handled:
            return
        data = {
            "step": anomaly.step,
            "loss": repr(anomaly.loss),
            "kind": anomaly.kind,
            "skip_from": anomaly.skip_from,
            "skip_to": anomaly.skip_to,
            "action": action,
        }
        if action == "warn":
            self.bus.emit(self.name, "loss_anomaly", f"{anomaly.reason} (warning only)", data)
            return
        self._anomaly_handled = True
        # No save on the way out: the weights after a NaN are poisoned.
        self._write_own(
            attempt.attempt_dir / KILL_FILE, {"killed_by": KILLED_BY_LOSS, "reason": anomaly.reason}
        )
        if action == "stop":
            self.bus.emit(self.name, "loss_anomaly", f"{anomaly.reason}; stopping the run", data)
            self._stop_reason = f"stopped after a loss anomaly: {anomaly.reason}"
            self.request_stop(now=True)
            return
        self.skip_windows.append((anomaly.skip_from, anomaly.skip_to))
        self._write_own(self.layout.run_dir(self.name) / SKIP_FILE, self.skip_windows)
        self._rollback_from = anomaly.skip_from
        self.bus.emit(
            self.name,
            "loss_anomaly",
            f"{anomaly.reason}; rolling back to a checkpoint before step {anomaly.skip_from} "
            f"and skipping the data of steps {anomaly.skip_from}-{anomaly.skip_to}",
            data,
        )
        self.follower.loss_watch.rolled_back()
        self.signal_trainer(signal.SIGKILL)

    def _set_aside_after_rollback(self) -> None:
        """Checkpoints saved at or after the anomaly hold poisoned weights: quarantine them."""
        if self._rollback_from is None:
            return
        first_bad, self._rollback_from = self._rollback_from, None
        reason = f"saved after the loss anomaly at step {first_bad}"
        self.checkpoints.set_aside_from(first_bad, reason)
        if self._memory is not None:  # the snapshots hold the poisoned weights too
            self._lineage = new_lineage(self.layout.run_dir(self.name))
            discard(self._memory)

    def check_hang(self) -> None:
        """Called by the pump: a hung attempt gets its stacks captured, then is stopped."""
        attempt = self.attempt
        if attempt is None or self._hang_handled or self.stop_requested:
            return
        verdict = self.follower.hung()
        if verdict is None:
            return
        self._hang_handled = True
        self.bus.emit(
            self.name,
            "hung",
            f"attempt {attempt.n}: {verdict.reason}",
            {
                "attempt": attempt.n,
                "idle_s": verdict.idle_s,
                "timeout_s": verdict.timeout_s,
                "phase": verdict.phase,
            },
        )
        self._write_own(
            attempt.attempt_dir / KILL_FILE, {"killed_by": KILLED_BY_HANG, "reason": verdict.reason}
        )
        self._hang_task = asyncio.create_task(self._stop_hung(attempt))

    async def _stop_hung(self, attempt: LiveAttempt) -> None:
        pids = attempt.pids()
        trainer = pids.get("trainer_pid")
        targets = [trainer] if isinstance(trainer, int) else []
        stacks = attempt.attempt_dir / "stacks.txt"
        summary = await asyncio.to_thread(capture_stacks, targets, stacks, 20.0)
        self.bus.emit(self.name, "stacks", summary, {"path": str(stacks)})
        # SIGTERM first (a chance to save), SIGKILL after stop_grace: the shim escalates.
        self._end_attempt(attempt)

    def _observe_instrumentation(self, records: list[dict[str, Any]]) -> None:
        started = self.attempt.started_at if self.attempt is not None else None
        for record in records:
            ts = record.get("ts")
            if started is not None and isinstance(ts, int | float) and ts < started:
                continue  # an earlier attempt's line, replayed after a daemon restart
            self.instrumentation.observe(record)

    def status(self) -> dict[str, Any]:
        job = self.store.get_job(self.name)
        return {
            "state": job.state if job else "unknown",
            "current_attempt": self.attempt.to_json() if self.attempt else None,
            "progress": self.follower.progress.to_json(),
        }


def _read_record(path: Path) -> dict[str, Any] | None:
    """A JSON object written by the shim or the runner; None when missing, damaged or
    unreadable (an I/O error is no reason to stop supervising)."""
    try:
        record = read_json(path)
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    return record if isinstance(record, dict) else None


def _tail(path: Path, count: int) -> list[str]:
    """The log's last lines, or none when it cannot be read."""
    try:
        return tail_lines(path, count)
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return []


def _read_skip_windows(path: Path) -> list[tuple[int, int]]:
    """The data windows skipped after loss anomalies; [] when missing or unreadable."""
    try:
        saved = read_json(path)
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return []
    windows: list[tuple[int, int]] = []
    for item in saved if isinstance(saved, list) else []:
        if (
            isinstance(item, list)
            and len(item) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
        ):
            windows.append((item[0], item[1]))
    return windows


async def _start_time_of(pid: int, *, tries: int = 600) -> int | None:
    """The start time of a child we just spawned (it cannot be gone: we have not
    reaped it); out of descriptors, wait for one rather than record none."""
    for _ in range(tries):
        try:
            return process_start_time(pid)
        except ProcessUnreadable:
            await asyncio.sleep(0.1)
    return None
