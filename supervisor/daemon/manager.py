"""All jobs of one daemon: submission, re-adoption after a restart, the pump loop."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from ftsup.supervisor import outlock
from ftsup.supervisor.atomicio import read_json
from ftsup.supervisor.checkpoints import discovery
from ftsup.supervisor.daemon.attempt import LiveAttempt
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.daemon.diagnose import classify_attempt
from ftsup.supervisor.daemon.runner import JobRunner, Preflight
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.protocol import RequestError
from ftsup.supervisor.resume import ResumePoint
from ftsup.supervisor.shim import PIDS_FILE
from ftsup.supervisor.spec import SpecError, parse_spec
from ftsup.supervisor.spec_types import JobSpec
from ftsup.supervisor.store import AttemptRow, Store

log = logging.getLogger("ftsup.daemon")
PUMP_INTERVAL = 0.2


def select_resume(spec: JobSpec) -> ResumePoint:
    """The newest valid, resumable checkpoint; invalid newer ones are quarantined.

    Called only while no trainer of the job runs, so a half-written newest
    folder is an interrupted save, not one in progress.
    """
    choice = discovery.select_resume(spec.output_dir, world_size=spec.launch.world_size)
    moved = [(q.moved_to, q.report.reason or "invalid") for q in choice.quarantined]
    return ResumePoint(choice.path, choice.step or 0, moved)


class JobManager:
    def __init__(
        self,
        store: Store,
        bus: EventBus,
        layout: Layout,
        env: dict[str, str],
        preflight: Preflight | None = None,
    ) -> None:
        self.store = store
        self.preflight = preflight
        self.bus = bus
        self.layout = layout
        self.env = env
        self.runners: dict[str, JobRunner] = {}
        self._pump_task: asyncio.Task[None] | None = None

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
        )
        self.runners[spec.name] = runner
        return runner

    # submission -----------------------------------------------------------
    def submit(self, spec: JobSpec, *, accept_drift: bool = False) -> JobRunner:
        existing = self.store.get_job(spec.name)
        if existing is not None and existing.live:
            raise RequestError(
                "job_exists",
                f"a job named {spec.name!r} is already "
                f"{existing.state}; stop it first or choose another [job] name",
            )
        holder = self.store.live_job_on(str(spec.output_dir))
        if holder is not None:
            raise RequestError(
                "output_locked",
                f"{spec.output_dir} is in use by job "
                f"{holder.name!r} ({holder.state}); two runs must never write "
                "the same checkpoints",
                {"holder": holder.name},
            )
        if outlock.is_locked(spec.output_dir):
            who = outlock.read_holder(spec.output_dir) or {}
            raise RequestError(
                "output_locked",
                f"{spec.output_dir} is locked by job "
                f"{who.get('job')!r} (pid {who.get('pid')}), outside this "
                "daemon's jobs",
                {"holder": who.get("job")},
            )
        run_dir = self.layout.run_dir(spec.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.toml").write_text(spec.text)
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
            if attempt is not None and attempt.ended_at is None:
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
            else:
                runner.start()

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
        self._pump_task = asyncio.create_task(self._pump_forever(), name="pump")

    async def _pump_forever(self) -> None:
        while True:
            for runner in list(self.runners.values()):
                try:
                    runner.pump()
                    runner.check_hang()
                except Exception:
                    log.exception("job %s: reading progress failed", runner.name)
            await asyncio.sleep(PUMP_INTERVAL)

    async def close(self) -> None:
        """Stop supervising (the daemon exits); the runs themselves keep going."""
        tasks = [r.task for r in self.runners.values() if r.task is not None]
        if self._pump_task is not None:
            tasks.append(self._pump_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
