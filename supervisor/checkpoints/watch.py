"""Watch a job's output folder and report each checkpoint once its writer is done.

A checkpoint is judged finished when its ftsup manifest appears (written last,
atomically), or when `trainer_state.json` (HF) or `latest` (DeepSpeed) exists
and nothing in the folder has changed for `settle` seconds. Only then is it
validated and handed to `on_checkpoint`, so a half-written save is never
reported as broken. A checkpoint that changes again after being reported is
judged again and reported again (the latest report wins).

Events come from watchdog: inotify where it works, `PollingObserver` when
configured ("polling", for network filesystems where inotify sees nothing) or
when inotify fails (watch or instance limit), reported through `on_problem`
instead of crashing. A periodic rescan catches events the kernel dropped.

Callbacks run on the watcher's own thread, one at a time: the daemon posts
them into its loop with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from ftsup.supervisor.contract import CHECKPOINT_RE

from ..manifest import MANIFEST_NAME
from .deepspeed import LATEST
from .discovery import list_checkpoints, manifests_expected
from .files import folder_stats
from .hf import TRAINER_STATE
from .report import CheckpointReport
from .validate import validate_checkpoint

log = logging.getLogger(__name__)

WatchMode = Literal["auto", "inotify", "polling"]
DEFAULT_SETTLE = 2.0


# Reads (ours included: validation opens every file) and metadata-only changes
# say nothing about a save in progress; reacting to them would loop.
_IGNORED_EVENTS = frozenset({"opened", "closed_no_write", "attrib"})


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: CheckpointWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _IGNORED_EVENTS:
            return
        for raw in (event.src_path, event.dest_path):
            if raw:
                self._watcher._touch(os.fsdecode(raw))


class CheckpointWatcher:
    """Watches `output_dir` (created if missing) until `stop()`.

    `settle`: seconds without writes after `trainer_state.json`/`latest` before
    a checkpoint counts as finished. `require_manifest`: the writer writes an
    ftsup manifest, so wait for it however long the hashing takes (None: yes
    when an existing checkpoint here has one). `observer_factory` replaces the
    native observer (tests inject a failing one).
    """

    def __init__(
        self,
        output_dir: Path,
        on_checkpoint: Callable[[CheckpointReport], None],
        *,
        on_problem: Callable[[str], None] | None = None,
        mode: WatchMode = "auto",
        settle: float = DEFAULT_SETTLE,
        poll_interval: float = 1.0,
        rescan_interval: float = 30.0,
        world_size: int | None = None,
        require_manifest: bool | None = None,
        deep: bool = False,
        report_existing: bool = False,
        observer_factory: Callable[[], BaseObserver] | None = None,
    ) -> None:
        if mode not in ("auto", "inotify", "polling"):
            raise ValueError(f"watch mode must be auto, inotify or polling, not {mode!r}")
        self.output_dir = Path(output_dir).absolute()
        self._on_checkpoint = on_checkpoint
        self._on_problem = on_problem
        self._mode: WatchMode = mode
        self._settle = settle
        self._poll_interval = poll_interval
        self._rescan_interval = rescan_interval
        self._world_size = world_size
        self._require_manifest = require_manifest
        self._deep = deep
        self._report_existing = report_existing
        self._observer_factory = observer_factory
        self._lock = threading.Condition()
        self._pending: dict[str, float] = {}  # name -> monotonic time of its last event
        self._seen: set[str] = set()  # judged already (only the worker thread writes it)
        # name -> (size and newest mtime of the folder, monotonic time first seen so):
        # events lag behind the disk, so quiet also means "the folder stopped changing"
        self._stable: dict[str, tuple[tuple[int, float], float]] = {}
        self._reported: dict[str, tuple[object, ...]] = {}  # name -> what was last reported
        self._stopping = False
        self._observer: BaseObserver | None = None
        self._thread: threading.Thread | None = None
        self.active_mode: Literal["inotify", "polling", "stopped"] = "stopped"
        self._read_problem: str | None = None  # the last one reported (not every 0.5 s)

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        known = list_checkpoints(self.output_dir)
        self._start_observer()
        if self._report_existing:
            now = time.monotonic() - self._settle
            with self._lock:
                self._pending.update((p.name, now) for p in known)
        else:
            self._seen = {p.name for p in known}
        self._thread = threading.Thread(target=self._run, name="ftsup-ckpt-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.active_mode = "stopped"

    def __enter__(self) -> CheckpointWatcher:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- observers ----------------------------------------------------------------

    def _start_observer(self) -> None:
        if self._mode != "polling":
            try:
                self._observer = self._schedule(self._native())
                self.active_mode = "inotify"
                return
            except OSError as exc:
                self._problem(
                    f"inotify unavailable for {self.output_dir} ({exc}); "
                    f"polling every {self._poll_interval:g}s instead"
                )
        self._observer = self._schedule(PollingObserver(timeout=self._poll_interval))
        self.active_mode = "polling"

    def _native(self) -> BaseObserver:
        if self._observer_factory is not None:
            return self._observer_factory()
        return Observer()

    def _schedule(self, observer: BaseObserver) -> BaseObserver:
        observer.schedule(_Handler(self), str(self.output_dir), recursive=True)
        try:
            observer.start()
        except BaseException:
            observer.stop()
            raise
        return observer

    def _observer_died(self) -> bool:
        observer = self._observer
        if observer is None:
            return False
        return not observer.is_alive() or not all(e.is_alive() for e in observer.emitters)

    def _fall_back_to_polling(self) -> None:
        self._problem(
            f"inotify watcher for {self.output_dir} stopped (watch limit?); "
            f"polling every {self._poll_interval:g}s instead"
        )
        if self._observer is not None:
            self._observer.stop()
        self._observer = self._schedule(PollingObserver(timeout=self._poll_interval))
        self.active_mode = "polling"
        self._rescan(time.monotonic())

    # -- events -----------------------------------------------------------------

    def _touch(self, path: str) -> None:
        try:
            rel = Path(path).relative_to(self.output_dir)
        except ValueError:
            return
        if not rel.parts or not CHECKPOINT_RE.match(rel.parts[0]):
            return
        with self._lock:
            self._pending[rel.parts[0]] = time.monotonic()
            self._lock.notify_all()

    def _rescan(self, now: float) -> None:
        """Folders present but never seen: events may have been dropped."""
        with self._lock:
            for path in list_checkpoints(self.output_dir):
                if path.name not in self._pending and path.name not in self._seen:
                    self._pending[path.name] = now

    # -- the worker -------------------------------------------------------------

    def _run(self) -> None:
        next_rescan = time.monotonic() + self._rescan_interval
        while True:
            with self._lock:
                if self._stopping:
                    return
                self._lock.wait(timeout=min(self._settle / 4, 0.5) or 0.05)
                if self._stopping:
                    return
                pending = dict(self._pending)
            now = time.monotonic()
            if self.active_mode == "inotify" and self._observer_died():
                self._fall_back_to_polling()
            try:
                if now >= next_rescan:
                    next_rescan = now + self._rescan_interval
                    self._rescan(now)
                for name, last in pending.items():
                    self._consider(name, last, now)
                self._read_problem = None
            except OSError as exc:  # EMFILE, EIO, a mount gone: report once, keep watching
                message = f"{self.output_dir} could not be read: {exc}"
                if message != self._read_problem:
                    self._read_problem = message
                    self._problem(message)

    def _consider(self, name: str, last: float, now: float) -> None:
        folder = self.output_dir / name
        if not folder.is_dir():  # quarantined, rotated or deleted
            self._forget(name, last)
            return
        if not self._finished(folder, idle=now - last, now=now):
            return
        with self._lock:
            if self._pending.get(name) != last:  # written to meanwhile: wait again
                return
            del self._pending[name]
        self._seen.add(name)
        self._stable.pop(name, None)
        try:
            report = validate_checkpoint(
                folder,
                deep=self._deep,
                world_size=self._world_size,
                require_manifest=self._manifest_required(),
            )
        except OSError as exc:
            self._problem(f"{folder} could not be validated: {exc}")
            return
        if not report.checked:  # not a verdict: say so once, and look again later
            if self._reported.get(name) != ("unchecked", report.reason):
                self._reported[name] = ("unchecked", report.reason)
                self._problem(f"{folder.name}: {report.reason}")
            self._seen.discard(name)
            with self._lock:  # as if just written: judged again once it settles
                self._pending[name] = time.monotonic()
            return
        key = (report.format, report.valid, report.resumable, report.reason, report.size_bytes)
        if self._reported.get(name) == key:
            return  # judged again after a stray event, same verdict: say it once
        self._reported[name] = key
        try:
            self._on_checkpoint(report)
        except Exception:
            log.exception("checkpoint callback failed for %s", folder)

    def _forget(self, name: str, last: float) -> None:
        with self._lock:
            if self._pending.get(name) == last:
                del self._pending[name]
        self._seen.discard(name)
        self._stable.pop(name, None)
        self._reported.pop(name, None)

    def _finished(self, folder: Path, *, idle: float, now: float) -> bool:
        """The manifest is atomic and last: done. Otherwise the marker must exist,
        no event for `settle` seconds, and the folder unchanged for as long."""
        if (folder / MANIFEST_NAME).is_file():
            return True
        if self._manifest_required():
            return False
        if not ((folder / TRAINER_STATE).is_file() or (folder / LATEST).is_file()):
            return False
        signature = folder_stats(folder)
        previous = self._stable.get(folder.name)
        if previous is None or previous[0] != signature:
            self._stable[folder.name] = (signature, now)
            return False
        return idle >= self._settle and now - previous[1] >= self._settle

    def _manifest_required(self) -> bool:
        if self._require_manifest is not None:
            return self._require_manifest
        return manifests_expected(self.output_dir)

    def _problem(self, message: str) -> None:
        log.warning("%s", message)
        if self._on_problem is not None:
            try:
                self._on_problem(message)
            except Exception:
                log.exception("watch problem callback failed")
