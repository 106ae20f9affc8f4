"""What a job's trainer is doing, read from the files it writes.

Each pump reads the new progress lines and log lines and folds them into: the
progress state, the goodput account, the hang detector and the loss watch. A
command that writes no progress lines is followed through what its trainer
writes anyway, in this order of trust: LLaMA-Factory's `trainer_log.jsonl`,
then the HF/tqdm training bar in its output (`trainer_logs`), and the newest
checkpoint's `trainer_state.json` (its steps only while neither of the others
gave one; its saves always). Once progress lines appear, only they count. It
decides nothing about the run: it reports what it saw (`Observations`) and the
runner acts. Lines an earlier attempt wrote (replayed after a daemon restart) count for
history and goodput, never as the current attempt's progress.

A line with a number out of range is skipped with a warning, never allowed to
end supervision. `trainer_state.json` lives in the user's output folder (a FIFO
there would block an `open()`), so it is read in a worker thread: `read()`
never waits for it, it picks the result up at a later pump; `trainer_log.jsonl`
likewise.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from ftsup.supervisor.checkpoints.discovery import list_checkpoints
from ftsup.supervisor.contract import PROGRESS_ELASTIC_CONVERT, PROGRESS_RENDEZVOUS
from ftsup.supervisor.daemon.loss_watch import Emit, LossWatch
from ftsup.supervisor.follow import LineFollower
from ftsup.supervisor.goodput import GoodputTracker
from ftsup.supervisor.health.hang import HangDetector, HangPolicy, HangVerdict
from ftsup.supervisor.health.loss import Anomaly
from ftsup.supervisor.progress import (
    JsonlFollower,
    ProgressState,
    check_record,
    records_from_trainer_state,
)
from ftsup.supervisor.protocol import EventKind
from ftsup.supervisor.spec_types import JobSpec
from ftsup.supervisor.trainer_logs import LlamaFactoryLog, TqdmReader

LOG_RING = 500
MAX_BAD_LINE_WARNINGS = 20  # then one last warning says the rest are skipped quietly
SLOW_READ_WARNING_S = 30.0
TRAINER_LOG_EVERY_S = 1.0
UNTIMED_SOURCE = "no timed step seen yet (the command writes no progress lines)"
T = TypeVar("T")


class _BackgroundRead(Generic[T]):
    """One read of a user's file in its own thread: a FIFO or an unresponsive mount
    there must never block the daemon's loop. `result` stays `default` when the read
    fails (an OSError is only "nothing read this time")."""

    def __init__(self, name: str, read: Callable[[], T], default: T) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.result = default
        self.warned = False
        threading.Thread(target=self._run, args=(read,), name=name, daemon=True).start()

    def _run(self, read: Callable[[], T]) -> None:
        try:
            self.result = read()
        except OSError:
            pass
        finally:
            self.done.set()


StateResult = tuple[float, list[dict[str, Any]]] | None


def _newest_trainer_state(output_dir: Path, newer_than: float) -> StateResult:
    """(mtime, records) of the newest checkpoint's trainer_state.json, if newer."""
    found = list_checkpoints(output_dir)  # by step, quarantined ones excluded
    if not found:
        return None
    state_file = found[-1] / "trainer_state.json"
    mtime = state_file.stat().st_mtime
    return (mtime, records_from_trainer_state(state_file)) if mtime > newer_than else None


@dataclass
class Observations:
    records: list[dict[str, Any]] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)
    saved_steps: list[int] = field(default_factory=list)  # checkpoint_saved, current attempt
    anomaly: Anomaly | None = None


class RunFollower:
    def __init__(self, spec: JobSpec, progress_file: Path, emit: Emit) -> None:
        self.spec = spec
        self._emit = emit
        self._bad_lines = 0
        self._state_read: _BackgroundRead[StateResult] | None = None
        self.progress = ProgressState()
        self.goodput = GoodputTracker()
        self.loss_watch = LossWatch(spec.health, emit)
        self.log_ring: deque[str] = deque(maxlen=LOG_RING)
        self._progress_file = JsonlFollower(progress_file)
        self._log: LineFollower | None = None
        self._hang: HangDetector | None = None
        self._attempt_started_at: float | None = None
        self._progress_seen = False
        self._trainer_state_mtime = 0.0
        # A multi-node launcher waits for the job's other nodes: why, for the status.
        self.waiting_for_nodes: str | None = None
        self._geometry: tuple[int, int] | None = None  # (world size, accumulation) last started
        # The trainer's own logs, for commands without progress lines.
        self._trainer_log = LlamaFactoryLog(spec.output_dir)
        self._trainer_log_read: _BackgroundRead[list[dict[str, Any]]] | None = None
        self._trainer_log_started = -TRAINER_LOG_EVERY_S  # monotonic time of the last read
        self._trainer_log_seen = False
        self._tqdm: TqdmReader | None = None
        self._tqdm_seen = False  # since the daemon started, any attempt
        self._tqdm_high = 0  # the highest step the bar showed in this attempt
        self._unfinished_fed = 0
        self._idle_reads: set[str] = set()  # output-folder reads done while no attempt runs
        if spec.command is not None:
            self.goodput.untimed_source = UNTIMED_SOURCE

    def begin_attempt(
        self, attempt_dir: Path, started_at: float, start_step: int, log_file: str
    ) -> None:
        self._attempt_started_at = started_at
        self.progress.begin_attempt(started_at, start_step)
        self.loss_watch.begin_attempt(start_step)
        # Monotonic clock from here on: an adopted attempt gets a fresh start-up allowance.
        self._hang = HangDetector(
            HangPolicy.from_spec(self.spec.health), started_at=time.monotonic()
        )
        self._log = LineFollower(attempt_dir / log_file)
        self._tqdm = TqdmReader(self.progress.max_steps)
        self._tqdm_high = 0
        self._unfinished_fed = 0
        self._idle_reads.clear()

    def end_attempt(self) -> None:
        self._hang = None
        self.waiting_for_nodes = None
        self._attempt_started_at = None
        self._idle_reads.clear()

    @property
    def reads_pending(self) -> bool:
        """A read of the output folder runs or waits to be picked up by a `read()`."""
        return self._state_read is not None or self._trainer_log_read is not None

    def _may_start_read(self, name: str) -> bool:
        """While an attempt runs, its trainer's files change: read them again and
        again. Without one, nothing writes them: one read (after a daemon restart,
        or the attempt's end) finds all there is, and a queued job costs nothing."""
        if self._attempt_started_at is not None:
            return True
        if name in self._idle_reads:
            return False
        self._idle_reads.add(name)
        return True

    def hung(self) -> HangVerdict | None:
        return self._hang.is_hung(time.monotonic()) if self._hang is not None else None

    # reading --------------------------------------------------------------
    def read(self) -> Observations:
        seen = Observations()
        log_mtime: float | None = None
        if self._log is not None:
            appended = self._log.read()
            log_mtime = appended.mtime
            seen.log_lines = [ln.decode(errors="replace") for ln in appended.lines]
            self.log_ring.extend(seen.log_lines)
        records = self._progress_file.read_new()
        if records:
            self._progress_seen = True
        elif not self._progress_seen and self.spec.command is not None:
            records = self._own_log_records(seen.log_lines, log_mtime)
        records = [r for r in records if self._usable(r)]
        for record in records:
            self._fold(record, seen)
        seen.records = records
        if seen.log_lines and not self._progress_seen and self._hang is not None:
            self._hang.heartbeat(time.monotonic())  # output is all a command shows
        return seen

    def _own_log_records(
        self, log_lines: list[str], log_mtime: float | None
    ) -> list[dict[str, Any]]:
        """For a command without progress lines: trainer_log.jsonl, else tqdm, plus
        trainer_state.json (its saves; its steps only while nothing else gave any)."""
        live = self._trainer_log_records()
        if self._tqdm_high:
            # Taking over from the bar: what it showed is not shown again, and older
            # lines (a stale file, an earlier attempt) never step back behind it.
            live = [
                r
                for r in live
                if self._of_current_attempt(r) and not _at_or_below(r.get("step"), self._tqdm_high)
            ]
        if any(self._of_current_attempt(r) for r in live):
            self._trainer_log_seen = True  # not by a stale file's old lines alone
        if not self._trainer_log_seen:
            bar = self._tqdm_records(log_lines, log_mtime)
            self._tqdm_seen = self._tqdm_seen or bool(bar)
            for record in bar:
                self._tqdm_high = max(self._tqdm_high, int(record["step"]))
            live += bar
        state = self._trainer_state_records()
        if self._trainer_log_seen or self._tqdm_seen:
            state = [r for r in state if r.get("event") == "checkpoint_saved"]
        merged = live + state  # each in order; merged by time for the goodput account
        return sorted(merged, key=lambda r: _time_of(r.get("ts")))

    def _tqdm_records(self, log_lines: list[str], log_mtime: float | None) -> list[dict[str, Any]]:
        """`log_mtime`: the output log's, as the read that gave `log_lines` found it."""
        reader, log = self._tqdm, self._log
        if reader is None or log is None:
            return []
        now = time.time()
        anchor = now if log_mtime is None else min(now, log_mtime)
        # The bar redraws after a carriage return with no newline until a log line:
        # the unfinished line is read too, from the last draw already fed.
        unfinished = log.unfinished()
        if log_lines or len(unfinished) < self._unfinished_fed:
            self._unfinished_fed = 0
        start = max(0, unfinished.rfind(b"\r", 0, self._unfinished_fed))
        tail = unfinished[start:].decode(errors="replace")
        self._unfinished_fed = len(unfinished)
        return reader.feed([*log_lines, tail], now, anchor)

    def _fold(self, record: dict[str, Any], seen: Observations) -> None:
        self.progress.apply(record)
        self.goodput.feed(record)
        current = self._of_current_attempt(record)
        event, step, loss = record.get("event", "step"), record.get("step"), record.get("loss")
        if current:
            self._feed_hang_detector(event, step)
            if event == "checkpoint_saved" and isinstance(step, int):
                seen.saved_steps.append(step)
            if event == PROGRESS_ELASTIC_CONVERT:
                self._report_conversion(record)
            if event == PROGRESS_RENDEZVOUS:
                self._follow_rendezvous(record)
            elif event in ("train_start", "step"):
                self.waiting_for_nodes = None
            if event == "train_start" and self.spec.launch.elastic_nodes:
                self._report_node_resize(record)
        if event != "step" or not isinstance(step, int) or not isinstance(loss, int | float):
            return
        if not current:
            self.loss_watch.remember(step, float(loss))
            return
        anomaly = self.loss_watch.observe(step, float(loss))
        if anomaly is not None and seen.anomaly is None:
            seen.anomaly = anomaly

    def _report_conversion(self, record: dict[str, Any]) -> None:
        """The trainer converted a sharded checkpoint to resume it on another world
        size (a ZeRO universal checkpoint): a `resized` event in the job's history."""
        keys = ("checkpoint", "step", "from_world_size", "to_world_size", "zero_stage", "seconds")
        data = {key: record.get(key) for key in keys}
        message = (
            f"converted {Path(str(record.get('checkpoint'))).name} (ZeRO-{data['zero_stage']}) "
            f"from {data['from_world_size']} to {data['to_world_size']} processes "
            f"in {data['seconds']} s (universal checkpoint)"
        )
        self._emit(EventKind.RESIZED, message, data)

    def _report_node_resize(self, record: dict[str, Any]) -> None:
        """`[launch] min_nodes`: torchrun decides how many nodes take part, so the
        daemon learns a new world size from the trainers' `train_start`."""
        world, accumulation = record.get("world_size"), record.get("gradient_accumulation_steps")
        if not isinstance(world, int) or not isinstance(accumulation, int):
            return
        before, self._geometry = self._geometry, (world, accumulation)
        if before is None or before[0] == world:
            return
        train = self.spec.train
        batch = (
            f", global batch {train.per_device_train_batch_size * world * accumulation} kept"
            if train is not None
            else ""
        )
        message = (
            f"world size {before[0]} -> {world}, accumulation {before[1]} -> {accumulation}"
            f"{batch} (nodes that joined the rendezvous)"
        )
        self._emit(EventKind.RESIZED, message, {"world_size": [before[0], world]})

    def _follow_rendezvous(self, record: dict[str, Any]) -> None:
        """A multi-node launcher waits for the job's other nodes (no hang: shown as
        `waiting_for_nodes`, with an event), or every node met (`joined`)."""
        if record.get("state") == "waiting":
            why = (
                f"waiting for nodes: rendezvous {record.get('rdzv_id')} at "
                f"{record.get('endpoint')} needs {record.get('nnodes')} node(s)"
            )
            self.waiting_for_nodes = why
            if self._hang is not None:
                self._hang.waiting_for_nodes(time.monotonic())
            data = {key: record.get(key) for key in ("rdzv_id", "endpoint", "nnodes")}
            self._emit(EventKind.WAITING_FOR_NODES, why, data)
        elif record.get("state") == "joined" and self.waiting_for_nodes is not None:
            self.waiting_for_nodes = None
            world = record.get("world_size")
            message = f"every node joined ({world} processes)"
            self._emit(EventKind.NODES_JOINED, message, {"world_size": world})

    def _of_current_attempt(self, record: dict[str, Any]) -> bool:
        started, ts = self._attempt_started_at, record.get("ts")
        if started is None:
            return False
        return not (isinstance(ts, int | float) and ts < started)

    def _feed_hang_detector(self, event: str, step: Any) -> None:
        detector = self._hang
        if detector is None:
            return
        now = time.monotonic()
        if event == "step" and isinstance(step, int):
            detector.step(step, now)
        elif event == "checkpoint_start":
            detector.checkpoint_started(now)
        elif event == "checkpoint_saved":
            detector.checkpoint_finished(now)
        else:
            detector.heartbeat(now)

    def _usable(self, record: dict[str, Any]) -> bool:
        problem = check_record(record)
        if problem is None:
            return True
        self._bad_lines += 1
        if self._bad_lines <= MAX_BAD_LINE_WARNINGS:
            more = (
                "; further bad lines are skipped without a warning"
                if self._bad_lines == MAX_BAD_LINE_WARNINGS
                else ""
            )
            self._emit(
                "warning",
                f"progress line skipped: {problem}{more}",
                {"problem": problem, "skipped": self._bad_lines},
            )
        return False

    async def settle(self, timeout: float = 10.0) -> None:
        """Before an ended attempt is judged: make the next `read()` see the newest
        trainer_state.json and trainer_log.jsonl (the last save or log line may have
        come after the pending read started). Waits off the loop, at most `timeout`
        per read."""
        if self._progress_seen or self.spec.command is None:
            return
        if self._state_read is not None:  # may predate the last save: let it end, drop it
            await asyncio.to_thread(self._state_read.done.wait, timeout)
        self._state_read = self._read_trainer_state()
        await asyncio.to_thread(self._state_read.done.wait, timeout)
        pending = self._trainer_log_read
        if pending is not None:
            await asyncio.to_thread(pending.done.wait, timeout)
            if not pending.done.is_set():
                return  # stalled: never two reads of the file at once
        # One more read after the attempt's end; what the pending one found is kept.
        self._start_trainer_log_read(pending.result if pending is not None else None)
        read = self._trainer_log_read
        if read is not None:
            await asyncio.to_thread(read.done.wait, timeout)

    def _trainer_log_records(self) -> list[dict[str, Any]]:
        """LLaMA-Factory's trainer_log.jsonl, read in a worker thread (picked up by a
        later call), at most once every TRAINER_LOG_EVERY_S."""
        found: list[dict[str, Any]] = []
        pending = self._trainer_log_read
        if pending is not None:
            if not pending.done.is_set():
                self._warn_if_slow(pending, "trainer_log.jsonl")
                return []
            found, self._trainer_log_read = pending.result, None
        due = time.monotonic() - self._trainer_log_started >= TRAINER_LOG_EVERY_S
        if due and self._may_start_read("trainer_log"):
            self._start_trainer_log_read()
        return found

    def _start_trainer_log_read(self, carry: list[dict[str, Any]] | None = None) -> None:
        self._trainer_log_started = time.monotonic()
        kept, reader = list(carry or []), self._trainer_log  # an earlier read's, not taken
        self._trainer_log_read = _BackgroundRead(
            "trainer-log", lambda: kept + reader.read(time.time()), kept
        )

    def _read_trainer_state(self) -> _BackgroundRead[StateResult]:
        output_dir, newer_than = self.spec.output_dir, self._trainer_state_mtime
        return _BackgroundRead(
            "trainer-state", lambda: _newest_trainer_state(output_dir, newer_than), None
        )

    def _warn_if_slow(self, pending: _BackgroundRead[Any], name: str) -> None:
        waited = time.monotonic() - pending.started
        if waited > SLOW_READ_WARNING_S and not pending.warned:
            pending.warned = True
            self._emit(
                "warning",
                f"reading {name} in {self.spec.output_dir} has not "
                f"answered for {waited:.0f}s (an unresponsive file system?)",
                {},
            )

    def _trainer_state_records(self) -> list[dict[str, Any]]:
        """For commands that write no progress.jsonl: the newest checkpoint's
        log_history, read in a worker thread (picked up by a later call)."""
        pending = self._state_read
        if pending is None:
            if self._may_start_read("trainer_state"):
                self._state_read = self._read_trainer_state()
            return []
        if not pending.done.is_set():
            self._warn_if_slow(pending, "trainer_state.json")
            return []
        self._state_read = None
        if pending.result is None:
            return []
        mtime, records = pending.result
        if mtime <= self._trainer_state_mtime:
            return []
        self._trainer_state_mtime = mtime
        return [
            r
            for r in records
            if r.get("event") != "step" or _after(r.get("step"), self.progress.step)
        ]


def _at_or_below(step: Any, high: int) -> bool:
    return isinstance(step, int) and not isinstance(step, bool) and step <= high


def _time_of(ts: Any) -> float:
    """Sort key: records without a time first (their order is kept)."""
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        return float(ts)
    return float("-inf")


def _after(step: Any, current: int) -> bool:
    return not isinstance(step, int | float) or isinstance(step, bool) or step > current
