"""What the TUI knows about the daemon: a pure, bounded, in-memory picture.

The connection feeds daemon answers and pushed events in; the screens read
from it. Nothing here does I/O or touches Textual, so the merge rules (which
of a late status answer and a fresh event wins, how series stay bounded, how a
resumed run rewinds its loss curve) are tested without a terminal.

Every collection is bounded: a TUI left open for days must not grow.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ftsup.supervisor import protocol
from ftsup.supervisor.protocol import EventKind, JobState

SERIES_MAX = 2000  # points per curve per job
EVENTS_MAX = 500  # durable events kept per job (and in the global timeline)
LOG_MAX = 5000  # log lines kept per job
GPU_SERIES_MAX = 120  # samples per GPU sparkline
SEEN_IDS_MAX = 20000
FOREIGN_LIMIT_MIB = 1024  # the daemon's default: other processes' memory that makes a GPU busy

LIVE_STATES = frozenset(protocol.LIVE_STATES)
RUNNING_STATES = frozenset(
    {JobState.PENDING, JobState.STARTING, JobState.RUNNING, JobState.STOPPING}
)
WAITING_STATES = frozenset({JobState.QUEUED, JobState.BLOCKED})  # in the GPU queue
FAILING_STATES = frozenset({JobState.BACKOFF, JobState.GAVE_UP, JobState.FAILED})
STREAM_KINDS = protocol.STREAM_ONLY_KINDS
# Durable events after which the job's summary (restarts, attempts, last exit)
# is stale: the app asks the daemon for a fresh `status` once.
REFETCH_KINDS = frozenset(
    {
        EventKind.SUBMITTED,
        EventKind.ATTEMPT_STARTED,
        EventKind.ATTEMPT_EXITED,
        EventKind.RESTART,
        EventKind.FINISHED,
        EventKind.GAVE_UP,
        EventKind.FAILED,
        EventKind.STOPPED,
        EventKind.ADOPTED,
        EventKind.QUARANTINE,
        EventKind.CHECKPOINT,
    }
)
# Events after which the GPU queue (who holds which GPU, who waits and why) may
# have changed: the app asks the daemon for `queue` again, once per burst. A
# job's every state change is a `state` stream event, so holders that end and
# jobs that leave the queue are covered by it.
QUEUE_KINDS = frozenset(
    {
        EventKind.STATE,
        EventKind.SUBMITTED,
        EventKind.QUEUED,
        EventKind.BLOCKED,
        EventKind.PLACED,
        EventKind.PREEMPTED,
        EventKind.PRIORITY,
        EventKind.RESIZED,
        EventKind.GPU_FAULT,
        EventKind.GPU_RESET,
    }
)


def as_float(value: Any) -> float | None:
    """A JSON number as float; None for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def as_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


@dataclass
class Change:
    """What one update touched, so that screens redraw only that."""

    jobs: set[str] = field(default_factory=set)  # summary (a dashboard row) changed
    roster: bool = False  # jobs appeared or disappeared
    series: set[str] = field(default_factory=set)  # curves changed
    logs: set[str] = field(default_factory=set)
    events: set[str] = field(default_factory=set)  # timelines changed ("" = global)
    detail: set[str] = field(default_factory=set)  # detailed status / checkpoints
    gpus: bool = False
    connection: bool = False
    resync: bool = False  # the daemon dropped events for us: ask for everything again
    refetch: bool = False  # a durable event made summaries stale: ask for `status`
    queue: bool = False  # the GPU queue's answer changed (the GPU map redraws)
    requeue: bool = False  # an event made the queue's answer stale: ask for `queue`

    def __ior__(self, other: Change) -> Change:
        self.jobs |= other.jobs
        self.roster |= other.roster
        self.series |= other.series
        self.logs |= other.logs
        self.events |= other.events
        self.detail |= other.detail
        self.gpus |= other.gpus
        self.connection |= other.connection
        self.resync |= other.resync
        self.refetch |= other.refetch
        self.queue |= other.queue
        self.requeue |= other.requeue
        return self

    def __bool__(self) -> bool:
        return bool(
            self.jobs
            or self.roster
            or self.series
            or self.logs
            or self.events
            or self.detail
            or self.gpus
            or self.connection
            or self.resync
            or self.refetch
            or self.queue
            or self.requeue
        )


class Series:
    """(step, value) points of one curve, bounded.

    A run resumed from an older checkpoint repeats steps; the points past the
    resume step are dropped so the curve shows the timeline the run is on.
    """

    def __init__(self, maxlen: int = SERIES_MAX) -> None:
        self.points: deque[tuple[float, float]] = deque(maxlen=maxlen)

    def add(self, x: float, y: float | None) -> bool:
        if y is None or not math.isfinite(y):
            return False
        while self.points and self.points[-1][0] > x:
            self.points.pop()
        if self.points and self.points[-1][0] == x:
            if self.points[-1][1] == y:
                return False
            self.points[-1] = (x, y)
        else:
            self.points.append((x, y))
        return True

    def rewind(self, x: float) -> None:
        """Drop the points past step `x` (a run resumed from an older checkpoint)."""
        while self.points and self.points[-1][0] > x:
            self.points.pop()

    @property
    def last_x(self) -> float | None:
        return self.points[-1][0] if self.points else None

    def extend(self, points: Iterable[tuple[float, float | None]]) -> None:
        for x, y in points:
            self.add(x, y)

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self) -> Iterator[tuple[float, float]]:
        return iter(self.points)


class LogBuffer:
    """The newest `maxlen` log lines of a job; `seq` counts every line ever added."""

    def __init__(self, maxlen: int = LOG_MAX) -> None:
        self.lines: deque[str] = deque(maxlen=maxlen)
        self.seq = 0
        self.attempt: int | None = None
        self.loaded = False  # the tail was fetched from the daemon once

    def append(self, lines: Iterable[str], attempt: int | None = None) -> None:
        if attempt is not None and self.attempt is not None and attempt != self.attempt:
            self._add(f"──── attempt {attempt} ────")
        if attempt is not None:
            self.attempt = attempt
        for line in lines:
            self._add(line)

    def replace(self, lines: Iterable[str], attempt: int | None, since: list[str]) -> None:
        """Load the daemon's tail; `since` are streamed lines that came in meanwhile."""
        tail = list(lines)
        self.lines.clear()
        self.attempt = attempt
        for line in tail:
            self._add(line)
        # Lines streamed while the request was in flight may already be in the tail.
        skip = 0
        for k in range(min(len(tail), len(since)), 0, -1):
            if tail[-k:] == since[:k]:
                skip = k
                break
        for line in since[skip:]:
            self._add(line)
        self.loaded = True

    def _add(self, line: str) -> None:
        self.lines.append(line)
        self.seq += 1

    def newer_than(self, seq: int) -> list[str] | None:
        """Lines added after `seq`, or None when some of them already fell out."""
        missing = self.seq - seq
        if missing > len(self.lines) or missing < 0:
            return None
        return list(self.lines)[len(self.lines) - missing :] if missing else []


@dataclass
class JobModel:
    name: str
    info: dict[str, Any] = field(default_factory=dict)  # the daemon's job summary
    progress: dict[str, Any] = field(default_factory=dict)
    state: str = "unknown"
    reason: str | None = None
    state_ts: float = 0.0
    loss: Series = field(default_factory=Series)
    eval_loss: Series = field(default_factory=Series)
    lr: Series = field(default_factory=Series)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_MAX))
    log: LogBuffer = field(default_factory=LogBuffer)
    detail: dict[str, Any] | None = None
    checkpoints: list[dict[str, Any]] | None = None  # the `checkpoints` answer
    checkpoints_note: str | None = None
    # Verdicts from `checkpoint` events (path -> report), minus what retention deleted:
    # the list when the daemon has no `checkpoints` request.
    seen_checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    history_loaded: bool = False
    series_note: str = ""  # why the curves may not start at step 0
    _last_step: float | None = None
    _last_eval: float | None = None

    def checkpoint_rows(self) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The checkpoints to show, newest first, and a note on where they come from."""
        if self.checkpoints is not None:
            return self.checkpoints, self.checkpoints_note
        if self.seen_checkpoints:
            rows = sorted(
                self.seen_checkpoints.values(),
                key=lambda c: as_int(c.get("step")) or -1,
                reverse=True,
            )
            return rows, "from the daemon's checkpoint events (it has no `checkpoints` request)"
        return None, self.checkpoints_note

    def fold_checkpoint_event(self, kind: str, data: dict[str, Any]) -> bool:
        """Keep `seen_checkpoints` current; True when it changed."""
        if kind == EventKind.CHECKPOINT and isinstance(data.get("path"), str):
            self.seen_checkpoints[data["path"]] = dict(data)
            return True
        if kind == EventKind.RETENTION and isinstance(data.get("deleted"), list):
            for path in data["deleted"]:
                self.seen_checkpoints.pop(str(path), None)
            return True
        if kind == EventKind.QUARANTINE and isinstance(data.get("path"), str):
            return self.seen_checkpoints.pop(data["path"], None) is not None
        return False

    @property
    def last_event(self) -> dict[str, Any] | None:
        return self.events[-1] if self.events else None

    @property
    def restarts(self) -> int:
        return as_int(self.info.get("restarts")) or 0

    @property
    def step(self) -> int | None:
        return as_int(self.progress.get("step"))

    @property
    def max_steps(self) -> int | None:
        return as_int(self.progress.get("max_steps"))

    @property
    def fraction(self) -> float | None:
        step, top = self.step, self.max_steps
        if step is None or not top:
            return None
        return step / top

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def gpu_devices(self) -> list[int] | None:
        """The GPUs this job uses, when the daemon says (`gpu_devices`)."""
        devices = self.info.get("gpu_devices")
        if isinstance(devices, list):
            return [d for d in devices if isinstance(d, int)]
        return None

    def add_progress(self, progress: dict[str, Any]) -> bool:
        """Fold a progress dict in; False when it is older than what is shown."""
        incoming = as_float(progress.get("last_update")) or 0.0
        current = as_float(self.progress.get("last_update")) or 0.0
        if self.progress and incoming < current:
            return False
        self.progress = dict(progress)
        step = as_float(progress.get("step"))
        if step is None:
            return True
        if self._last_step is not None and step < self._last_step:
            # A resumed attempt: its first report carries the old attempt's
            # loss with the resume step. Rewind the curves, plot nothing yet.
            for series in (self.loss, self.eval_loss, self.lr):
                series.rewind(step)
            self._last_step = step
            return True
        self._last_step = step
        self.loss.add(step, as_float(progress.get("loss")))
        self.lr.add(step, as_float(progress.get("lr")))
        eval_loss = as_float(progress.get("eval_loss"))
        if eval_loss is not None and eval_loss != self._last_eval:
            # Every report repeats the newest eval; plot it once, where it changed.
            self._last_eval = eval_loss
            self.eval_loss.add(step, eval_loss)
        return True

    def add_history(self, records: Iterable[dict[str, Any]]) -> None:
        """Progress records from the daemon's history (`progress_history`)."""
        for record in records:
            step = as_float(record.get("step"))
            if step is None:
                continue
            if record.get("event", "step") == "eval" or "eval_loss" in record:
                self.eval_loss.add(step, as_float(record.get("eval_loss")))
            self.loss.add(step, as_float(record.get("loss")))
            self.lr.add(step, as_float(record.get("lr")))
        self.history_loaded = True


@dataclass
class GpuModel:
    """The daemon's GPU monitor as last seen, with bounded per-GPU series."""

    status: str = "GPU monitor: waiting for the daemon"
    available: bool = False
    gpus: list[dict[str, Any]] = field(default_factory=list)
    series: dict[int, dict[str, deque[float]]] = field(default_factory=dict)

    def apply(self, result: dict[str, Any], *, sample: bool) -> None:
        """A `gpus` answer (sample=False: take its series) or a `gpu` event (append)."""
        status = result.get("status")
        if isinstance(status, str):
            self.status = status
        # `available` (docs/health.md); `active` from daemons before the one shape.
        available = result.get("available", result.get("active"))
        self.available = available if isinstance(available, bool) else status in (None, "ok")
        gpus = result.get("gpus")
        if isinstance(gpus, list):
            entries = [g for g in gpus if isinstance(g, dict)]
            if sample:
                for gpu in entries:
                    self._update_one(gpu, sample=True)
            else:
                self.gpus = entries
                self.series = {}
                for gpu in entries:
                    self._update_one(gpu, sample=False)
        elif "index" in result:
            self._update_one(result, sample=True)

    def _update_one(self, gpu: dict[str, Any], *, sample: bool) -> None:
        index = as_int(gpu.get("index"))
        if index is None:
            return
        for k, known in enumerate(self.gpus):
            if as_int(known.get("index")) == index:
                self.gpus[k] = {**known, **gpu}
                break
        else:
            self.gpus.append(dict(gpu))
            self.gpus.sort(key=lambda g: as_int(g.get("index")) or 0)
        series = self.series.setdefault(
            index, {"util": deque(maxlen=GPU_SERIES_MAX), "mem": deque(maxlen=GPU_SERIES_MAX)}
        )
        given = gpu.get("series")
        if not sample and isinstance(given, dict):
            for key in ("util", "mem"):
                values = given.get(key)
                if isinstance(values, list):
                    series[key].extend(v for v in map(as_float, values) if v is not None)
            return
        util = as_float(gpu.get("util"))
        if util is not None:
            series["util"].append(util)
        mem = mem_percent(gpu)
        if mem is not None:
            series["mem"].append(mem)

    def unavailable(self, message: str) -> None:
        self.status = message
        self.available = False
        self.gpus = []
        self.series = {}


@dataclass
class QueueModel:
    """The daemon's GPU queue (`queue`, docs/scheduling.md): who holds which GPU,
    and the waiting jobs in the order placement considers them, with why."""

    known: bool = False  # an answer came; False also when this daemon has no `queue`
    note: str = "GPU queue: waiting for the daemon"
    holders: dict[int, str] = field(default_factory=dict)  # GPU index -> job
    waiting: list[dict[str, Any]] = field(default_factory=list)
    # MiB held on a GPU by processes that are no ftsup job's, when the daemon says,
    # and from how much on that makes the GPU busy (daemon.toml; 1 GiB by default)
    foreign_mib: dict[int, int] = field(default_factory=dict)
    foreign_limit_mib: int = FOREIGN_LIMIT_MIB

    def apply(self, result: dict[str, Any]) -> None:
        self.known, self.note = True, ""
        self.holders = {}
        for entry in result.get("holding", []):
            if isinstance(entry, dict) and isinstance(entry.get("job"), str):
                for index in entry.get("gpus", []):
                    if as_int(index) is not None:
                        self.holders[int(index)] = entry["job"]
        waiting = [w for w in result.get("waiting", []) if isinstance(w, dict) and w.get("job")]
        self.waiting = sorted(waiting, key=lambda w: as_int(w.get("position")) or 0)
        foreign = result.get("foreign_mib")
        limit = as_int(result.get("foreign_limit_mib"))
        self.foreign_limit_mib = limit if limit is not None else FOREIGN_LIMIT_MIB
        self.foreign_mib = {}
        if isinstance(foreign, dict):
            for key, mib in foreign.items():
                if str(key).isdigit() and as_int(mib) is not None:
                    self.foreign_mib[int(key)] = int(mib)

    def unavailable(self, note: str) -> None:
        """An older daemon (no `queue`) or a failed answer: no holders, say why."""
        self.known, self.note = False, note
        self.holders, self.waiting, self.foreign_mib = {}, [], {}


def _quarantined_item(entry: Any) -> dict[str, Any]:
    """A quarantined folder as a checkpoint row: `{"path", "step", "reason"}` from
    the listing (docs/checkpoints.md), or a bare path from a daemon before it."""
    known = entry if isinstance(entry, dict) else {}
    path = str(known.get("path", entry))
    head, _, slug = path.rsplit("/", 1)[-1].partition(".invalid-")
    step = as_int(known.get("step"))
    if step is None and head.removeprefix("checkpoint-").isdigit():
        step = int(head.removeprefix("checkpoint-"))
    why = known.get("reason") if isinstance(known.get("reason"), str) else None
    return {
        "path": path,
        "step": step,
        "valid": False,
        "resumable": False,
        "reason": f"quarantined ({why or slug or 'invalid'})",
    }


def mem_percent(gpu: dict[str, Any]) -> float | None:
    used, total = as_float(gpu.get("mem_used")), as_float(gpu.get("mem_total"))
    if used is None or not total:
        return None
    return 100.0 * used / total


@dataclass
class ConnectionInfo:
    state: str = "connecting"  # connecting | connected | reconnecting | replay
    target: str = ""
    reason: str | None = None
    attempt: int = 0
    retry_in: float | None = None
    daemon: dict[str, Any] = field(default_factory=dict)
    degraded: str | None = None  # the daemon's state disk refuses writes (why)


class TuiState:
    """Every job, the GPUs and the connection, as the screens see them."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobModel] = {}
        self.gpus = GpuModel()
        self.queue = QueueModel()
        self.connection = ConnectionInfo()
        self.timeline: deque[dict[str, Any]] = deque(maxlen=EVENTS_MAX)
        self._seen_ids: set[int] = set()
        self._seen_order: deque[int] = deque()
        self.last_event_id = 0

    # lookups ----------------------------------------------------------------
    def job(self, name: str) -> JobModel:
        model = self.jobs.get(name)
        if model is None:
            model = self.jobs[name] = JobModel(name)
        return model

    def ordered_jobs(self) -> list[JobModel]:
        """Live jobs first, then the rest; by name within each group."""
        return sorted(self.jobs.values(), key=lambda j: (not j.live, j.name))

    def counts(self) -> dict[str, int]:
        counts = {"running": 0, "waiting": 0, "failing": 0, "finished": 0, "stopped": 0}
        for job in self.jobs.values():
            if job.state in WAITING_STATES:
                counts["waiting"] += 1
            elif job.state in RUNNING_STATES:
                counts["running"] += 1
            elif job.state in FAILING_STATES:
                counts["failing"] += 1
            elif job.state == JobState.FINISHED:
                counts["finished"] += 1
            elif job.state == JobState.STOPPED:
                counts["stopped"] += 1
        return counts

    # daemon answers ---------------------------------------------------------
    def apply_status_list(self, result: dict[str, Any]) -> Change:
        """The answer of `status` without a job: the full roster."""
        change = self._set_degraded(result.get("degraded"))
        jobs = [j for j in result.get("jobs", []) if isinstance(j, dict) and j.get("name")]
        names = {str(j["name"]) for j in jobs}
        if names != set(self.jobs):
            change.roster = True
        for gone in set(self.jobs) - names:
            del self.jobs[gone]
        for job_json in jobs:
            change |= self.apply_job_status(job_json)
        return change

    def apply_job_status(self, job_json: dict[str, Any], *, detail: bool = False) -> Change:
        """One job's summary (or, with detail, the answer of `status {job}`)."""
        name = str(job_json.get("name"))
        change = Change(jobs={name})
        if name not in self.jobs:
            change.roster = True
        model = self.job(name)
        model.info = {k: v for k, v in job_json.items() if k not in ("progress", "log_tail")}
        updated = as_float(job_json.get("updated_at")) or 0.0
        if updated >= model.state_ts:
            model.state = str(job_json.get("state", model.state))
            model.reason = job_json.get("reason")
            model.state_ts = updated
        progress = job_json.get("progress")
        if isinstance(progress, dict) and model.add_progress(progress):
            change.series.add(name)
        if detail:
            model.detail = dict(job_json)
            change.detail.add(name)
        return change

    def apply_queue(self, result: dict[str, Any] | None, note: str = "") -> Change:
        """The answer of `queue`, or None with why there is none (an older daemon)."""
        if result is None:
            self.queue.unavailable(note)
        else:
            self.queue.apply(result)
        return Change(queue=True)

    def apply_history(self, events: Iterable[dict[str, Any]]) -> Change:
        """Answers of `events`: durable events, deduplicated by id."""
        change = Change()
        for event in sorted(events, key=lambda e: as_int(e.get("id")) or 0):
            change |= self._add_durable(event)
        return change

    def apply_logs(self, name: str, result: dict[str, Any], since: list[str]) -> Change:
        lines = [str(x) for x in result.get("lines", []) if isinstance(x, str)]
        self.job(name).log.replace(lines, as_int(result.get("attempt")), since)
        return Change(logs={name})

    def apply_checkpoints(
        self, name: str, result: dict[str, Any] | None, note: str | None = None
    ) -> Change:
        model = self.job(name)
        if result is None:
            model.checkpoints, model.checkpoints_note = None, note
        else:
            items = [c for c in result.get("checkpoints", []) if isinstance(c, dict)]
            for entry in result.get("quarantined", []):  # renamed aside, never deleted
                items.append(_quarantined_item(entry))
            model.checkpoints = sorted(
                items, key=lambda c: as_int(c.get("step")) or -1, reverse=True
            )
            model.checkpoints_note = note
        return Change(detail={name})

    def apply_progress_history(self, name: str, result: dict[str, Any]) -> Change:
        records = [r for r in result.get("records", []) if isinstance(r, dict)]
        model = self.job(name)
        current = model.progress
        model.loss, model.eval_loss, model.lr = Series(), Series(), Series()
        model.add_history(records)
        model._last_step = model.loss.last_x
        model._last_eval = model.eval_loss.points[-1][1] if model.eval_loss.points else None
        if current:  # the live point is newer than the history's last line
            model.progress = {}
            model.add_progress(current)
        return Change(series={name})

    # pushed events ----------------------------------------------------------
    def apply_event(self, event: dict[str, Any]) -> Change:
        kind = event.get("kind")
        name = event.get("job")
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        assert isinstance(data, dict)
        if kind == EventKind.LAGGED:
            return Change(resync=True)
        if kind == EventKind.GPU:
            self.gpus.apply(data, sample=True)
            return Change(gpus=True)
        if kind in (EventKind.DEGRADED, EventKind.RECOVERED) and name is None:
            reason = event.get("message") if kind == EventKind.DEGRADED else None
            change = self._set_degraded(reason)
            if event.get("id") is not None:
                change |= self._add_durable(event)
            return change
        if not isinstance(name, str):
            return self._add_durable(event) if event.get("id") is not None else Change()
        if kind == EventKind.PROGRESS:
            new = name not in self.jobs  # submitted by someone else: ask for its summary
            changed = self.job(name).add_progress(data)
            if not changed and not new:
                return Change()
            return Change(jobs={name}, series={name}, roster=new, refetch=new)
        if kind == EventKind.LOG:
            lines = [str(x) for x in data.get("lines", []) if isinstance(x, str)]
            self.job(name).log.append(lines, as_int(data.get("attempt")))
            return Change(logs={name})
        if kind == EventKind.STATE:
            new = name not in self.jobs
            model = self.job(name)
            ts = as_float(event.get("ts")) or 0.0
            if ts >= model.state_ts:
                model.state = str(data.get("state", model.state))
                model.reason = data.get("reason") if isinstance(data.get("reason"), str) else None
                model.state_ts = ts
            return Change(jobs={name}, roster=new, requeue=True)
        return self._add_durable(event)

    def _set_degraded(self, reason: Any) -> Change:
        reason = str(reason) if reason else None
        if reason == self.connection.degraded:
            return Change()
        self.connection.degraded = reason
        return Change(connection=True)

    def _add_durable(self, event: dict[str, Any]) -> Change:
        event_id = as_int(event.get("id"))
        if event_id is not None:
            if event_id in self._seen_ids:
                return Change()
            self._seen_ids.add(event_id)
            self._seen_order.append(event_id)
            if len(self._seen_order) > SEEN_IDS_MAX:
                self._seen_ids.discard(self._seen_order.popleft())
            self.last_event_id = max(self.last_event_id, event_id)
        _insert_sorted(self.timeline, event)
        name = event.get("job")
        kind = event.get("kind")
        change = Change(events={""}, refetch=kind in REFETCH_KINDS, requeue=kind in QUEUE_KINDS)
        if isinstance(name, str):
            change.roster = name not in self.jobs
            model = self.job(name)
            _insert_sorted(model.events, event)
            change.events.add(name)
            change.jobs.add(name)
            data = event.get("data")
            if isinstance(data, dict) and model.fold_checkpoint_event(str(kind), data):
                change.detail.add(name)
        return change


def _insert_sorted(events: deque[dict[str, Any]], event: dict[str, Any]) -> None:
    """Append, keeping id order when a late history answer brings older events."""
    event_id = as_int(event.get("id"))
    if event_id is None or not events or (as_int(events[-1].get("id")) or 0) <= event_id:
        events.append(event)
        return
    items = list(events)
    items.append(event)
    items.sort(key=lambda e: as_int(e.get("id")) or 0)
    events.clear()
    events.extend(items[-(events.maxlen or len(items)) :])
