r"""One job's lifecycle: launch an attempt, wait for it, judge the exit, restart.

    pending -> starting -> running -> (exit) -> backoff -> starting -> ...
                                   \-> finished | stopped | gave_up | failed

The runner owns no process: the shim does. Everything the runner needs after a
daemon restart is in the store and in the attempt folder, so a new runner can
pick up an attempt that an earlier daemon launched (`adopt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor import policy
from ftsup.supervisor.atomicio import read_json, tail_lines, write_json_atomic
from ftsup.supervisor.checkpoints.discovery import list_checkpoints
from ftsup.supervisor.checkpoints.drift_guard import diff_fingerprints, drift_refused
from ftsup.supervisor.checkpoints.quarantine import quarantine as quarantine_checkpoint
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.exitwatch import wait_for_exit
from ftsup.supervisor.daemon.job_checkpoints import JobCheckpoints
from ftsup.supervisor.daemon.launcher import plan_attempt, spawn_shim
from ftsup.supervisor.daemon.loss_watch import LossWatch
from ftsup.supervisor.fingerprint import train_fingerprint
from ftsup.supervisor.follow import LineFollower
from ftsup.supervisor.goodput import GoodputTracker, checkpoint_advice
from ftsup.supervisor.health.diagnosis import KILLED_BY_HANG
from ftsup.supervisor.health.hang import HangDetector, HangPolicy
from ftsup.supervisor.health.loss import Anomaly
from ftsup.supervisor.health.stacks import capture_stacks
from ftsup.supervisor.manifest import ManifestError, read_manifest
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.procinfo import is_same_process, process_start_time, signal_group
from ftsup.supervisor.progress import JsonlFollower, ProgressState, records_from_trainer_state
from ftsup.supervisor.resume import ResumePoint, checkpoint_step
from ftsup.supervisor.shim import EXIT_FILE, LOG_FILE, PIDS_FILE
from ftsup.supervisor.spec_types import JobSpec
from ftsup.supervisor.store import AttemptRow, Store

log = logging.getLogger("ftsup.daemon")

LOG_RING = 500
SKIP_FILE = "skip_steps.json"  # data windows skipped after loss anomalies, [[from, to], ...]
KILLED_BY_LOSS = "ftsup-loss-anomaly"
KILL_FILE = "kill.json"  # who killed the attempt and why, read when judging its exit
TERMINAL_STATES = ("finished", "stopped", "gave_up", "failed")

ResumeSelector = Callable[[JobSpec], ResumePoint]
# ("ok" | "wait" | "fail", why): may an attempt be launched now (GPUs present and healthy)?
Preflight = Callable[[JobSpec], tuple[str, str]]
PREFLIGHT_RETRY = 5.0
Classifier = Callable[[dict[str, Any], list[str], "LiveAttempt"], tuple[str | None, str]]


@dataclass
class LiveAttempt:
    """An attempt whose shim may still be running."""

    n: int
    attempt_dir: Path
    shim_pid: int
    shim_start: int | None
    start_step: int
    resume_from: Path | None
    started_at: float
    child: subprocess.Popen[bytes] | None = None  # set when this daemon started it

    def pids(self) -> dict[str, Any]:
        return read_json(self.attempt_dir / PIDS_FILE) or {}


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
    ) -> None:
        self.spec = spec
        self.store = store
        self.bus = bus
        self.layout = layout
        self._select_resume = select_resume
        self._classify = classify
        self._preflight = preflight
        self.checkpoints = JobCheckpoints(spec, store, bus, on_disk_pause=self.pause_for_disk)
        self._env = env
        self.progress = ProgressState()
        self._progress_follower = JsonlFollower(layout.progress_file(spec.name))
        self._log_follower: LineFollower | None = None
        self.log_ring: deque[str] = deque(maxlen=LOG_RING)
        self.attempt: LiveAttempt | None = None
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.stop_requested = False
        self.restart_requested = False
        self._last_stored_step = -1
        self._trainer_state_mtime = 0.0
        self._progress_seen = False
        self._hang: HangDetector | None = None
        self._hang_handled = False
        self._hang_task: asyncio.Task[None] | None = None
        self.loss_watch = LossWatch(
            spec.health, lambda kind, message, data: self.bus.emit(self.name, kind, message, data)
        )
        self._anomaly_handled = False
        self._rollback_from: int | None = None
        self._stop_reason: str | None = None
        self.goodput = GoodputTracker()
        self._refresh_attempt_starts()
        saved = read_json(layout.run_dir(spec.name) / SKIP_FILE)
        self.skip_windows: list[tuple[int, int]] = (
            [(int(a), int(b)) for a, b in saved] if isinstance(saved, list) else []
        )

    @property
    def name(self) -> str:
        return self.spec.name

    # lifecycle ------------------------------------------------------------
    def start(self, *, adopt: LiveAttempt | None = None, delay: float = 0.0) -> None:
        self.task = asyncio.create_task(self._run(adopt, delay), name=f"job:{self.name}")

    async def _run(self, adopt: LiveAttempt | None, delay: float) -> None:
        self.checkpoints.start()
        try:
            if delay > 0 and not await self._sleep(delay):
                return self._finish("stopped", "stopped on request while waiting to restart")
            attempt = adopt
            while True:
                if attempt is None:
                    if self.stop_requested:
                        return self._finish("stopped", "stopped on request")
                    attempt = await self._launch()
                    if attempt is None:
                        return
                row = await self._wait(attempt)
                attempt = None
                decision = policy.decide(self.history(), self.spec.restart)
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

    def _conclude(self, decision: policy.Decision, row: AttemptRow) -> None:
        if isinstance(decision, policy.Done):
            self._finish("finished", decision.reason)
        elif isinstance(decision, policy.Stopped):
            self._finish("stopped", self._stop_reason or decision.reason)
        else:
            state = "failed" if row.returncode == policy.EXIT_CONFIG else "gave_up"
            tail = tail_lines(self.layout.attempt_dir(self.name, row.n) / LOG_FILE, 15)
            reason = (
                f"{decision.reason}; last attempt: {row.reason}" if row.reason else decision.reason
            )
            self._finish(state, reason, {"log_tail": tail})

    def _finish(self, state: str, reason: str, data: dict[str, Any] | None = None) -> None:
        self.store.set_job_state(self.name, state, reason)
        self.bus.emit(self.name, state, reason, data)
        self.bus.emit(self.name, "state", state, {"state": state, "reason": reason})

    def _set_state(
        self, state: str, reason: str | None = None, next_start_at: float | None = None
    ) -> None:
        self.store.set_job_state(self.name, state, reason, next_start_at)
        self.bus.emit(self.name, "state", state, {"state": state, "reason": reason})

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
        job = self.store.get_job(self.name)
        first = job.first_attempt if job else 1
        return [
            policy.AttemptOutcome(
                returncode=a.returncode,
                signal=a.signal,
                start_step=a.start_step,
                last_step=a.last_step,
                stop_requested=a.stop_requested,
                failure_kind=a.failure_kind,
            )
            for a in self.store.attempts(self.name)
            if a.n >= first and a.ended_at is not None
        ]

    # one attempt ----------------------------------------------------------
    async def _launch(self) -> LiveAttempt | None:
        if not await self._wait_until_launchable():
            return None
        self._set_state("starting")
        await asyncio.to_thread(self._set_aside_after_rollback)
        resume = await asyncio.to_thread(self._select_resume, self.spec)
        for path, reason in resume.quarantined:
            self.bus.emit(
                self.name,
                "quarantine",
                f"{path.name}: {reason}",
                {"path": str(path), "reason": reason},
            )
        if resume.path is not None and not self._drift_allowed(resume.path):
            return None
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
        env = dict(self._env)
        if self.skip_windows:  # the data a loss anomaly rolled back past
            env["FTSUP_SKIP_STEPS"] = ",".join(f"{a}-{b}" for a, b in self.skip_windows)
        try:
            plan = plan_attempt(
                self.spec, self.layout, attempt=n, resume_from=resume.path, base_env=env
            )
        except ValueError as exc:  # a launch the trainer cannot do (e.g. deepspeed)
            self.store.update_attempt(self.name, n, ended_at=time.time(), reason=str(exc))
            self._finish("failed", f"cannot launch: {exc}")
            return None
        try:
            child = spawn_shim(self.spec, self.layout, attempt=n, plan=plan)
        except OSError as exc:
            self.store.update_attempt(self.name, n, ended_at=time.time(), reason=str(exc))
            self._finish("failed", f"cannot start the shim: {exc}")
            return None
        attempt = LiveAttempt(
            n=n,
            attempt_dir=self.layout.attempt_dir(self.name, n),
            shim_pid=child.pid,
            shim_start=process_start_time(child.pid),
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
            f"attempt {n} started {where}",
            {
                "attempt": n,
                "resume_from": str(resume.path) if resume.path else None,
                "start_step": resume.step,
                "argv": plan.argv,
            },
        )
        self._begin_attempt(attempt)
        return attempt

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

    def _drift_allowed(self, checkpoint: Path) -> bool:
        """Refuse a resume whose data order or optimizer state would silently change."""
        if self.spec.train is None:
            return True  # a command's configuration is opaque to ftsup
        try:
            recorded = read_manifest(checkpoint).fingerprint
        except ManifestError:
            return True  # no fingerprint to compare (validation decided it is resumable)
        world_size = self.spec.launch.nproc_per_node * self.spec.launch.nnodes
        drifts = diff_fingerprints(recorded, train_fingerprint(self.spec.train, world_size))
        if not drifts:
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
        self.progress.begin_attempt(attempt.started_at, attempt.start_step)
        self.loss_watch.begin_attempt(attempt.start_step)
        self._refresh_attempt_starts()
        self._anomaly_handled = False
        # Monotonic clock from here on: an adopted attempt gets a fresh start-up allowance.
        self._hang = HangDetector(
            HangPolicy.from_spec(self.spec.health), started_at=time.monotonic()
        )
        self._hang_handled = False
        self._log_follower = LineFollower(attempt.attempt_dir / LOG_FILE)

    async def _wait(self, attempt: LiveAttempt) -> AttemptRow:
        await wait_for_exit(attempt.shim_pid, attempt.shim_start, attempt.child)
        exit_info = read_json(attempt.attempt_dir / EXIT_FILE)
        if exit_info is None:
            exit_info = await self._wait_orphaned_trainer(attempt)
        exit_info.update(read_json(attempt.attempt_dir / KILL_FILE) or {})
        self._hang = None
        self.pump()  # the last progress and log lines before judging
        pids = attempt.pids()
        last_step = max(attempt.start_step, self._attempt_last_step(attempt))
        log_tail = tail_lines(attempt.attempt_dir / LOG_FILE, 40)
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
        """The shim died without writing exit.json (it was killed): wait for its trainer."""
        pids = attempt.pids()
        trainer, start = pids.get("trainer_pid"), pids.get("trainer_start")
        if isinstance(trainer, int) and is_same_process(trainer, start):
            self.bus.emit(
                self.name,
                "warning",
                f"attempt {attempt.n}: shim lost; following the trainer directly",
            )
            await _poll_until_gone(trainer, start)
        return {
            "returncode": None,
            "signal": None,
            "error": "shim_lost",
            "message": "the shim died; the trainer's exit status is unknown",
        }

    def _attempt_last_step(self, attempt: LiveAttempt) -> int:
        return self.progress.attempt_max_step

    # requests -------------------------------------------------------------
    def request_stop(self, *, now: bool) -> None:
        self.stop_requested = True
        self._wake.set()
        attempt = self.attempt
        if attempt is None:
            return
        self.store.update_attempt(self.name, attempt.n, stop_requested=True)
        self._set_state("stopping", "kill requested" if now else "graceful stop requested")
        if now:
            self.signal_trainer(signal.SIGKILL)
        _signal_pid(attempt.shim_pid, attempt.shim_start, signal.SIGTERM)

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

    def signal_trainer(self, sig: signal.Signals) -> bool:
        """Send `sig` to the trainer's whole process group (checked by start time)."""
        attempt = self.attempt
        if attempt is None:
            return False
        pids = attempt.pids()
        pgid, start = pids.get("pgid"), pids.get("trainer_start")
        if not isinstance(pgid, int):
            return False
        return signal_group(pgid, sig, leader_start_time=start)

    # following ------------------------------------------------------------
    def pump(self) -> None:
        """Read new progress and log lines; called often from the daemon's loop."""
        records = self._progress_follower.read_new()
        if records:
            self._progress_seen = True
        elif not self._progress_seen and self.spec.command is not None:
            records = self._trainer_state_records()
        for record in records:
            self.progress.apply(record)
            self.goodput.feed(record)
            self._feed_hang_detector(record)
            self._watch_loss(record, self._of_current_attempt(record))
            step = record.get("step")
            if record.get("event") == "checkpoint_saved" and isinstance(step, int):
                self.checkpoints.after_save(step)
        if records:
            self.bus.emit(self.name, "progress", "", self.progress.to_json())
            self._store_step()
        if self._log_follower is not None:
            lines = [ln.decode(errors="replace") for ln in self._log_follower.read_lines()]
            if lines and not self._progress_seen and self._hang is not None:
                self._hang.heartbeat(time.monotonic())  # output is all a plain command shows
            if lines:
                self.log_ring.extend(lines)
                if self.bus.has_subscribers("log"):
                    attempt = self.attempt.n if self.attempt else None
                    self.bus.emit(self.name, "log", "", {"lines": lines, "attempt": attempt})

    def _refresh_attempt_starts(self) -> None:
        job = self.store.get_job(self.name)
        first = job.first_attempt if job else 1
        self.goodput.set_attempt_starts(
            [a.started_at for a in self.store.attempts(self.name) if a.n >= first]
        )

    def goodput_report(self) -> dict[str, Any] | None:
        """Wall time split into productive, stall, recomputed and downtime, plus advice."""
        job = self.store.get_job(self.name)
        attempts = [
            a
            for a in self.store.attempts(self.name)
            if job is not None and a.n >= job.first_attempt
        ]
        if job is None or not attempts:
            return None
        until = time.time() if job.live else max(a.ended_at or a.started_at for a in attempts)
        report = self.goodput.report(attempts[0].started_at, until)
        failures = sum(1 for o in self.history() if o.is_failure)
        configured = self.spec.train.save_steps if self.spec.train else None
        advice = checkpoint_advice(
            self.goodput, wall_s=report.wall_s, failures=failures, configured_steps=configured
        )
        return {**report.to_json(), "checkpoint_advice": advice}

    def _of_current_attempt(self, record: dict[str, Any]) -> bool:
        """False for lines an earlier attempt wrote (replayed after a daemon restart)."""
        attempt, ts = self.attempt, record.get("ts")
        if attempt is None:
            return False
        return not (isinstance(ts, int | float) and ts < attempt.started_at)

    def _watch_loss(self, record: dict[str, Any], current: bool) -> None:
        step, loss = record.get("step"), record.get("loss")
        if record.get("event", "step") != "step" or not isinstance(step, int):
            return
        if not isinstance(loss, int | float) or isinstance(loss, bool):
            return
        if not current:
            self.loss_watch.remember(step, float(loss))
            return
        anomaly = self.loss_watch.observe(step, float(loss))
        if anomaly is not None:
            self._on_loss_anomaly(anomaly)

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
        write_json_atomic(
            attempt.attempt_dir / KILL_FILE, {"killed_by": KILLED_BY_LOSS, "reason": anomaly.reason}
        )
        if action == "stop":
            self.bus.emit(self.name, "loss_anomaly", f"{anomaly.reason}; stopping the run", data)
            self._stop_reason = f"stopped after a loss anomaly: {anomaly.reason}"
            self.request_stop(now=True)
            return
        self.skip_windows.append((anomaly.skip_from, anomaly.skip_to))
        write_json_atomic(self.layout.run_dir(self.name) / SKIP_FILE, self.skip_windows)
        self._rollback_from = anomaly.skip_from
        self.bus.emit(
            self.name,
            "loss_anomaly",
            f"{anomaly.reason}; rolling back to a checkpoint before step {anomaly.skip_from} "
            f"and skipping the data of steps {anomaly.skip_from}-{anomaly.skip_to}",
            data,
        )
        self.loss_watch.rolled_back()
        self.signal_trainer(signal.SIGKILL)

    def _set_aside_after_rollback(self) -> None:
        """Checkpoints saved at or after the anomaly hold poisoned weights: quarantine them."""
        if self._rollback_from is None:
            return
        first_bad, self._rollback_from = self._rollback_from, None
        for path in list_checkpoints(self.spec.output_dir):
            step = checkpoint_step(path)
            if step is not None and step >= first_bad:
                reason = f"saved after the loss anomaly at step {first_bad}"
                moved = quarantine_checkpoint(path, reason)
                self.bus.emit(
                    self.name,
                    "quarantine",
                    f"{path.name}: {reason}",
                    {"path": str(moved), "reason": reason},
                )

    def _feed_hang_detector(self, record: dict[str, Any]) -> None:
        detector = self._hang
        if detector is None or not self._of_current_attempt(record):
            return
        now = time.monotonic()
        event, step = record.get("event", "step"), record.get("step")
        if event == "step" and isinstance(step, int):
            detector.step(step, now)
        elif event == "checkpoint_start":
            detector.checkpoint_started(now)
        elif event == "checkpoint_saved":
            detector.checkpoint_finished(now)
        else:
            detector.heartbeat(now)

    def check_hang(self) -> None:
        """Called by the pump: a hung attempt gets its stacks captured, then is stopped."""
        detector, attempt = self._hang, self.attempt
        if detector is None or attempt is None or self._hang_handled or self.stop_requested:
            return
        verdict = detector.is_hung(time.monotonic())
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
        write_json_atomic(
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
        _signal_pid(attempt.shim_pid, attempt.shim_start, signal.SIGTERM)

    def _store_step(self) -> None:
        attempt = self.attempt
        reached = self.progress.attempt_max_step
        if attempt is not None and reached != self._last_stored_step:
            self._last_stored_step = reached
            self.store.update_attempt(
                self.name, attempt.n, last_step=max(reached, attempt.start_step)
            )

    def _trainer_state_records(self) -> list[dict[str, Any]]:
        """For commands that write no progress.jsonl: the newest checkpoint's log_history."""
        newest = _newest_checkpoint(self.spec.output_dir)
        if newest is None:
            return []
        state_file = newest / "trainer_state.json"
        try:
            mtime = state_file.stat().st_mtime
        except FileNotFoundError:
            return []
        if mtime <= self._trainer_state_mtime:
            return []
        self._trainer_state_mtime = mtime
        return [
            r
            for r in records_from_trainer_state(state_file)
            if r.get("event") != "step" or r.get("step", 0) > self.progress.step
        ]

    def status(self) -> dict[str, Any]:
        job = self.store.get_job(self.name)
        attempt = self.attempt
        current = None
        if attempt is not None:
            pids = attempt.pids()
            current = {
                "n": attempt.n,
                "started_at": attempt.started_at,
                "resume_from": str(attempt.resume_from) if attempt.resume_from else None,
                "start_step": attempt.start_step,
                "shim_pid": attempt.shim_pid,
                "trainer_pid": pids.get("trainer_pid"),
            }
        return {
            "state": job.state if job else "unknown",
            "current_attempt": current,
            "progress": self.progress.to_json(),
        }


def _signal_pid(pid: int, start: int | None, sig: signal.Signals) -> None:
    if is_same_process(pid, start):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


async def _poll_until_gone(pid: int, start: int | None) -> None:
    try:
        await wait_for_exit(pid, start)
    except OSError:
        while is_same_process(pid, start):
            await asyncio.sleep(0.5)


def _newest_checkpoint(output_dir: Path) -> Path | None:
    best: tuple[int, Path] | None = None
    try:
        children = list(output_dir.iterdir())
    except FileNotFoundError:
        return None
    for child in children:
        step = checkpoint_step(child)
        if step is not None and (best is None or step > best[0]):
            best = (step, child)
    return best[1] if best else None
