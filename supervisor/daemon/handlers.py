"""One handler per request type. Each validates its arguments and answers JSON."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import tomllib
from pathlib import Path
from typing import Any

from ftsup.supervisor.atomicio import tail_lines, write_text_atomic
from ftsup.supervisor.checkpoints.listing import checkpoint_listing
from ftsup.supervisor.contract import LOG_FILE
from ftsup.supervisor.daemon.gpus import GpuSupervision
from ftsup.supervisor.daemon.manager import JobManager
from ftsup.supervisor.daemon.runner import JobRunner
from ftsup.supervisor.daemon.server import HandlerTableError, check_handler_table
from ftsup.supervisor.daemon.state_rebuild import SPEC_FILE
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.policy import failure_restarts
from ftsup.supervisor.progress import ProgressState
from ftsup.supervisor.protocol import EventKind, JobState, RequestError, RequestType
from ftsup.supervisor.spec import SpecError, parse_spec, with_priority
from ftsup.supervisor.spec_types import MAX_PRIORITY, MIN_PRIORITY, JobSpec
from ftsup.supervisor.store import AttemptRow, JobRow, Store, ended_outcomes
from ftsup.supervisor.userfiles import in_thread

HISTORY_CAP = 20000
HISTORY_BYTES = 8 * 1024 * 1024
HISTORY_FIELDS = ("ts", "step", "event", "loss", "eval_loss", "lr", "grad_norm", "epoch")


INT_MAX = 2**63 - 1  # what SQLite stores; anything larger is a bad request, not "internal"
LINES_CAP = 100_000


def _str_arg(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError("bad_request", f"{request.get('type')}: {key!r} must be a string")
    if "\0" in value:
        raise RequestError("bad_request", f"{request.get('type')}: {key!r} contains a NUL byte")
    return value


# Parsing a job file looks at the user's paths (model folders, a DeepSpeed config):
# off the loop, with a deadline, so a dead mount cannot freeze the daemon.
SPEC_TIMEOUT = 10.0


async def _parse_off_loop(text: str, path: Path) -> JobSpec:
    try:
        return await in_thread(lambda: parse_spec(text, path), SPEC_TIMEOUT, "the job file")
    except SpecError as exc:
        raise RequestError("invalid_spec", str(exc)) from None
    except TimeoutError:
        raise RequestError("bad_request", _spec_timeout(str(path))) from None


def _spec_timeout(path: str) -> str:
    return (
        f"the paths {path} names did not answer within {SPEC_TIMEOUT:g}s "
        "(an unresponsive file system?); fix them and submit again"
    )


def _int_arg(
    request: dict[str, Any], key: str, default: int, *, low: int = 0, high: int = INT_MAX
) -> int:
    """An integer argument in [low, high]; bools are not integers here."""
    value = request.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError("bad_request", f"{request.get('type')}: {key!r} must be an integer")
    if not low <= value <= high:
        raise RequestError(
            "bad_request", f"{request.get('type')}: {key!r} must be in [{low}, {high}]"
        )
    return value


def _stored_progress(attempts: list[AttemptRow]) -> dict[str, Any] | None:
    """Progress of a job with no runner: the furthest step its attempts recorded."""
    if not attempts:
        return None
    return ProgressState(step=max(a.last_step for a in attempts)).to_json()


def env_keys(spec_text: str) -> list[str] | None:
    """The names in `[command] env`, never the values (they hold tokens). Read from
    the stored TOML alone: no validation, no file system access on the loop."""
    try:
        data = tomllib.loads(spec_text)
    except tomllib.TOMLDecodeError:
        return None
    command = data.get("command")
    env = command.get("env") if isinstance(command, dict) else None
    return sorted(env) if isinstance(env, dict) else None


# The method of `Handlers` that answers each request type; `subscribe` is the
# connection's own (server.py). Checked at import: a request type without a handler,
# or a handler for a type the protocol does not name, stops the daemon from loading.
ROUTES: dict[RequestType, str] = {
    RequestType.PING: "ping",
    RequestType.START: "start",
    RequestType.STATUS: "status",
    RequestType.LIST: "list",
    RequestType.STOP: "stop",
    RequestType.RESTART: "restart",
    RequestType.SIGNAL: "signal",
    RequestType.SAVE: "save",
    RequestType.LOGS: "logs",
    RequestType.EVENTS: "events",
    RequestType.SHUTDOWN: "shutdown",
    RequestType.GPUS: "gpus_view",
    RequestType.CHECKPOINTS: "checkpoints",
    RequestType.PROGRESS_HISTORY: "progress_history",
    RequestType.GPU_RESET: "gpu_reset",
    RequestType.GPU_SIMULATE_XID: "gpu_simulate_xid",
    RequestType.GPU_SIMULATE_PROCESS: "gpu_simulate_process",
    RequestType.QUEUE: "queue",
    RequestType.PRIORITY: "priority",
}


class Handlers:
    def __init__(
        self,
        manager: JobManager,
        store: Store,
        layout: Layout,
        on_shutdown: Any,
        gpus: GpuSupervision,
    ) -> None:
        self.gpus = gpus
        self.manager = manager
        self.store = store
        self.layout = layout
        self.on_shutdown = on_shutdown

    def table(self) -> dict[str, Any]:
        """The handler of each request type (ROUTES, checked against the protocol)."""
        return {kind.value: getattr(self, method) for kind, method in ROUTES.items()}

    async def ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "time": time.time(), "degraded": self.store.degraded}

    async def start(self, request: dict[str, Any]) -> dict[str, Any]:
        path = Path(_str_arg(request, "spec_path"))
        text = _str_arg(request, "spec_text")
        spec = await _parse_off_loop(text, path)
        await self.manager.submit(spec, accept_drift=bool(request.get("accept_drift")))
        for warning in spec.warnings:  # deprecated keys, retention at odds: in the job's history
            self.manager.bus.emit(spec.name, EventKind.WARNING, str(warning))
        return self.job_json(spec.name)

    async def status(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("job")
        if name is None:
            return {
                "jobs": [self.job_json(job.name, row=job) for job in self.store.jobs()],
                "counts": self.manager.summary(),
                "spares": self.manager.spares.summary(),
                "degraded": self.store.degraded,
            }
        return {
            **self.job_json(_str_arg(request, "job"), detail=True),
            "degraded": self.store.degraded,
        }

    async def list(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "jobs": [self.job_json(job.name, row=job) for job in self.store.jobs()],
            "degraded": self.store.degraded,
        }

    async def stop(self, request: dict[str, Any]) -> dict[str, Any]:
        name = _str_arg(request, "job")
        runner = self.manager.get(name)
        job = self._job(name)
        if not job.live:
            raise RequestError("not_running", f"job {name!r} is already {job.state}")
        runner.request_stop(now=bool(request.get("now")))
        return self.job_json(name)

    async def priority(self, request: dict[str, Any]) -> dict[str, Any]:
        """`ftsup priority JOB N`: written into the stored job file (database and
        runs/<job>/job.toml), so a new daemon keeps it; the queue decides again now."""
        name = _str_arg(request, "job")
        if "priority" not in request:
            raise RequestError("bad_request", "priority: 'priority' is required")
        value = _int_arg(request, "priority", 0, low=MIN_PRIORITY, high=MAX_PRIORITY)
        job = self._job(name)
        old = await _parse_off_loop(job.spec_text, Path(job.spec_path))
        try:
            spec = await in_thread(lambda: with_priority(old, value), SPEC_TIMEOUT, "the job file")
        except SpecError as exc:
            raise RequestError("invalid_spec", str(exc)) from None
        except TimeoutError:
            raise RequestError("bad_request", _spec_timeout(job.spec_path)) from None
        if spec.job.priority != old.job.priority:
            write_text_atomic(self.layout.run_dir(name) / SPEC_FILE, spec.text)
            self.store.set_spec_text(name, spec.text)
            runner = self.manager.runners.get(name)
            if runner is not None:
                runner.spec = spec
            self.manager.bus.emit(
                name,
                EventKind.PRIORITY,
                f"priority {old.job.priority} -> {value}",
                {"old": old.job.priority, "new": value},
            )
            self.manager.placement.update_spec(spec)
        return self.job_json(name)

    async def restart(self, request: dict[str, Any]) -> dict[str, Any]:
        name = _str_arg(request, "job")
        try:
            self.manager.restart(name)
        except SpecError as exc:
            raise RequestError("invalid_spec", f"the stored spec no longer parses: {exc}") from None
        return self.job_json(name)

    async def signal(self, request: dict[str, Any]) -> dict[str, Any]:
        name = _str_arg(request, "job")
        raw = _str_arg(request, "signal").upper()
        try:
            sig = signal.Signals[raw if raw.startswith("SIG") else f"SIG{raw}"]
        except KeyError:
            raise RequestError("bad_request", f"unknown signal {raw!r}") from None
        if not self.manager.get(name).signal_trainer(sig):
            raise RequestError("not_running", f"job {name!r} has no running trainer")
        self.manager.bus.emit(
            name, EventKind.SIGNAL, f"sent {sig.name} to the trainer's process group"
        )
        return {"sent": sig.name}

    async def save(self, request: dict[str, Any]) -> dict[str, Any]:
        """Save a checkpoint now: SIGUSR2 to the trainer, which saves at the next step."""
        name = _str_arg(request, "job")
        runner = self.manager.get(name)
        if runner.attempt is None:
            raise RequestError("not_running", f"job {name!r} has no running trainer")
        refusal = runner.instrumentation.can_save()
        if refusal is not None:
            raise RequestError("not_instrumented", f"{name}: {refusal}")
        if not runner.request_save():
            raise RequestError("not_running", f"job {name!r} has no running trainer")
        self.manager.bus.emit(name, EventKind.SAVE_REQUESTED, "asked the trainer to save now")
        return {"requested": True}

    async def logs(self, request: dict[str, Any]) -> dict[str, Any]:
        name = _str_arg(request, "job")
        self._job(name)
        attempts = self.store.attempts(name)
        if not attempts:
            return {"attempt": None, "lines": [], "path": None}
        n = attempts[-1].n
        if request.get("attempt") is not None:
            n = _int_arg(request, "attempt", n, low=1)
        if all(a.n != n for a in attempts):
            raise RequestError("not_found", f"job {name!r} has no attempt {n!r}")
        lines = _int_arg(request, "lines", 100, high=LINES_CAP)
        path = self.layout.attempt_dir(name, n) / LOG_FILE
        return {"attempt": n, "path": str(path), "lines": tail_lines(path, lines)}

    async def events(self, request: dict[str, Any]) -> dict[str, Any]:
        job = request.get("job")
        if job is not None:
            self._job(_str_arg(request, "job"))
        return {
            "events": self.store.events(
                job,
                limit=min(_int_arg(request, "limit", 100), HISTORY_CAP),
                after_id=_int_arg(request, "after_id", 0),
            )
        }

    async def checkpoints(self, request: dict[str, Any]) -> dict[str, Any]:
        """The job's checkpoint listing, validated now (off the loop): the same
        shape as `ftsup ckpt ls --json` (checkpoints.listing)."""
        job = self._job(_str_arg(request, "job"))
        output_dir = Path(job.output_dir)
        require_manifest = True if job.kind == "train" else None  # as the daemon resumes

        def check() -> dict[str, Any]:
            return checkpoint_listing(output_dir, require_manifest=require_manifest)

        try:
            listing = await in_thread(check, 120.0, "checking checkpoints")
        except (TimeoutError, OSError) as exc:  # could not check: say so, judge nothing
            raise RequestError(
                "unavailable", f"could not check the checkpoints in {output_dir}: {exc}"
            ) from None
        return listing

    async def progress_history(self, request: dict[str, Any]) -> dict[str, Any]:
        """The newest progress lines of a job (loss curves from before a client attached)."""
        name = _str_arg(request, "job")
        self._job(name)
        limit = min(max(_int_arg(request, "limit", 2000), 1), HISTORY_CAP)
        path = self.layout.progress_file(name)
        lines = await asyncio.to_thread(tail_lines, path, limit, max_bytes=HISTORY_BYTES)
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append({k: record.get(k) for k in HISTORY_FIELDS if k in record})
        return {"records": records}

    async def gpus_view(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.gpus.snapshot()

    async def gpu_reset(self, request: dict[str, Any]) -> dict[str, Any]:
        index = _int_arg(request, "index", -1, low=-1)
        if index < 0:
            raise RequestError("bad_request", "gpu_reset: 'index' must be a GPU index")
        self.gpus.mark_healthy(index)
        self.manager.placement.replan()  # jobs waiting for this GPU may start now
        return self.gpus.snapshot()

    async def gpu_simulate_xid(self, request: dict[str, Any]) -> dict[str, Any]:
        index = _int_arg(request, "index", -1, low=-1)
        xid = _int_arg(request, "xid", -1, low=-1)
        if index < 0 or xid < 0:
            raise RequestError("bad_request", "gpu_simulate_xid: 'index' and 'xid' are required")
        self.gpus.simulate_xid(index, xid)
        return self.gpus.snapshot()

    async def gpu_simulate_process(self, request: dict[str, Any]) -> dict[str, Any]:
        index = _int_arg(request, "index", -1, low=-1)
        pid = _int_arg(request, "pid", 0, low=0)
        size = _int_arg(request, "bytes", -1, low=-1)
        if index < 0 or pid <= 0 or size < 0:
            raise RequestError(
                "bad_request", "gpu_simulate_process: 'index', 'pid' and 'bytes' are required"
            )
        self.gpus.simulate_process(index, pid, size)
        return self.gpus.snapshot()

    async def queue(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.manager.placement.queue()

    async def shutdown(self, request: dict[str, Any]) -> dict[str, Any]:
        self.on_shutdown()
        return {"shutting_down": True}

    # views ----------------------------------------------------------------
    def _job(self, name: str) -> JobRow:
        job = self.store.get_job(name)
        if job is None:
            raise RequestError("not_found", f"no job named {name!r} (see `ftsup ls`)")
        return job

    def job_json(
        self, name: str, *, detail: bool = False, row: JobRow | None = None
    ) -> dict[str, Any]:
        """`row`: the job's row when the caller has it (`status` of every job: one
        lookup per job, not five)."""
        job = row if row is not None else self._job(name)
        runner = self.manager.runners.get(name)
        attempts = self.store.current_attempts(name)
        ended = [a for a in attempts if a.ended_at is not None]
        outcomes = ended_outcomes(attempts)
        data: dict[str, Any] = {
            "name": job.name,
            "kind": job.kind,
            "state": job.state,
            "reason": job.reason,
            "output_dir": job.output_dir,
            "spec_path": job.spec_path,
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "next_start_at": job.next_start_at,
            "attempts": len(attempts),
            "restarts": failure_restarts(outcomes),
            "progress": runner.progress.to_json() if runner else _stored_progress(attempts),
            "current_attempt": runner.attempt.to_json() if runner and runner.attempt else None,
            "last_exit": ended[-1].to_json() if ended else None,
            "goodput": runner.goodput_report(job, attempts) if runner else None,
            "standby": runner.standbys.to_json() if runner else None,
            "instrumentation": runner.instrumentation.to_json() if runner else None,
            "gpu_devices": _gpu_devices(runner),
            # A multi-node job's launcher waits in the rendezvous for its other nodes.
            "waiting_for_nodes": runner.follower.waiting_for_nodes if runner else None,
            "nodes": _nodes(runner),
        }
        if detail:
            data["env_keys"] = env_keys(job.spec_text)
            data["attempt_history"] = [a.to_json() for a in attempts]
            if job.state in (JobState.GAVE_UP, JobState.FAILED) and ended:
                path = self.layout.attempt_dir(name, ended[-1].n) / LOG_FILE
                data["log_tail"] = tail_lines(path, 15)
        return data


def check_routes(routes: dict[RequestType, str]) -> None:
    """Raise HandlerTableError unless `routes` covers the protocol and names methods."""
    check_handler_table(routes)
    for method in routes.values():
        if not callable(getattr(Handlers, method, None)):
            raise HandlerTableError(f"Handlers has no method {method!r} (handlers.ROUTES)")


check_routes(ROUTES)


def _nodes(runner: JobRunner | None) -> dict[str, Any] | None:
    """A multi-node job's nodes as last read from the shared folder (and a fresh
    read started for the next call: the folder is never read on the loop)."""
    if runner is None or runner.nodes is None:
        return None
    runner.report_node()
    return runner.nodes.to_json()


def _gpu_devices(runner: JobRunner | None) -> list[int] | None:
    devices = runner.devices if runner is not None else None
    return list(devices) if devices is not None else None
