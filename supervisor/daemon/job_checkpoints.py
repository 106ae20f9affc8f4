"""One job's checkpoints while it is live: watched, validated, recorded, rotated,
and the disk they land on guarded.

The watcher runs in its own thread; each finished checkpoint is handed to the
event loop, recorded in the state database and announced. Retention (only when
`[checkpoint] keep_last` is set) deletes by step, never the newest valid one.
The disk guard warns, and below the hard floor pauses the run gracefully (the
trainer saves and exits 75; the next launch waits until space returns).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ftsup.supervisor.checkpoints import discovery
from ftsup.supervisor.checkpoints.guards import DiskVerdict, check_disk
from ftsup.supervisor.checkpoints.quarantine import quarantine
from ftsup.supervisor.checkpoints.report import CheckpointReport, checkpoint_step
from ftsup.supervisor.checkpoints.retention import apply_retention, plan_retention
from ftsup.supervisor.checkpoints.watch import CheckpointWatcher
from ftsup.supervisor.contract import checkpoint_name
from ftsup.supervisor.daemon.bus import EventBus
from ftsup.supervisor.spec_types import JobSpec
from ftsup.supervisor.store import Store
from ftsup.supervisor.userfiles import in_thread

log = logging.getLogger("ftsup.daemon")
VALIDATE_TIMEOUT = 300.0  # the fast path takes milliseconds; this is for dead mounts


def disk_usage(folder: Path) -> int:
    """Bytes the folder occupies on disk (blocks, not apparent sizes: small files
    cost a whole block, and that is what fills a disk)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


WARN_CHECKPOINTS = 3
PAUSE_CHECKPOINTS = 2


class JobCheckpoints:
    def __init__(
        self, spec: JobSpec, store: Store, bus: EventBus, on_disk_pause: Callable[[str], None]
    ) -> None:
        self.spec = spec
        self.store = store
        self.bus = bus
        self._on_disk_pause = on_disk_pause
        self._watcher: CheckpointWatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_disk_level = "ok"
        self.last_size: int | None = None

    @property
    def world_size(self) -> int:
        return self.spec.launch.world_size

    def start(self) -> None:
        if self._watcher is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._watcher = CheckpointWatcher(
            self.spec.output_dir,
            self._from_thread,
            on_problem=self._problem_from_thread,
            mode=self.spec.checkpoint.watch,  # type: ignore[arg-type]
            world_size=self.world_size,
            require_manifest=self.require_manifest,
        )
        try:
            self._watcher.start()
        except OSError as exc:
            self.bus.emit(self.spec.name, "warning", f"checkpoint watcher off: {exc}")
            self._watcher = None

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop(timeout=2.0)
            self._watcher = None

    def set_aside_from(self, first_step: int, reason: str) -> None:
        """Quarantine every checkpoint at or after `first_step` (e.g. saved after a NaN)."""
        for path in discovery.list_checkpoints(self.spec.output_dir):
            step = checkpoint_step(path)
            if step is not None and step >= first_step:
                moved = quarantine(path, reason)
                self.bus.emit(
                    self.spec.name,
                    "quarantine",
                    f"{path.name}: {reason}",
                    {"path": str(moved), "reason": reason},
                )

    @property
    def require_manifest(self) -> bool | None:
        """A built-in trainer job always seals its checkpoints with a manifest."""
        return True if self.spec.train is not None else None

    async def _validate_all(self) -> list[CheckpointReport] | None:
        """Every checkpoint's report, off the loop and with a deadline; None (and a
        warning) when the folder could not be read at all."""
        try:
            return await in_thread(
                lambda: discovery.validate_all(
                    self.spec.output_dir,
                    world_size=self.world_size,
                    require_manifest=self.require_manifest,
                ),
                VALIDATE_TIMEOUT,
                f"checking {self.spec.output_dir}",
            )
        except OSError as exc:
            self.bus.emit(self.spec.name, "warning", f"could not check the checkpoints: {exc}")
            return None

    async def sweep(self) -> None:
        """Record what the watcher has not reported yet (it waits for writes to
        settle; an attempt that just ended may have saved a moment ago)."""
        for report in await self._validate_all() or []:
            self.on_checkpoint(report)

    # from the watcher's thread ---------------------------------------------
    def _from_thread(self, report: CheckpointReport) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_checkpoint, report)

    def _problem_from_thread(self, message: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                self.bus.emit, self.spec.name, "warning", f"checkpoint watcher: {message}"
            )

    # on the loop --------------------------------------------------------------
    def on_checkpoint(self, report: CheckpointReport) -> None:
        name = self.spec.name
        if not report.checked:  # "could not check" is not a verdict: record nothing
            self.bus.emit(
                name,
                "warning",
                f"{report.path.name}: {report.reason} (not judged; checked again later)",
                {"path": str(report.path), "reason": report.reason},
            )
            return
        known = self.store.checkpoint(name, str(report.path))
        if known is not None and bool(known["valid"]) == report.valid:
            return  # seen already (by the watcher or a sweep)
        self.store.record_checkpoint(
            name,
            path=str(report.path),
            step=report.step,
            size_bytes=report.size_bytes,
            valid=report.valid,
            resumable=report.resumable,
            reason=report.reason,
        )
        verdict = "valid" if report.valid else f"invalid: {report.reason}"
        self.bus.emit(name, "checkpoint", f"{report.path.name} {verdict}", report.to_json())
        if report.valid:
            self.last_size = disk_usage(report.path) or report.size_bytes
            self._guard_disk()
            if self.spec.checkpoint.keep_last is not None:
                asyncio.get_running_loop().create_task(self._rotate())

    def _guard_disk(self) -> None:
        verdict = self.disk_verdict()
        if verdict.level == self._last_disk_level:
            return
        self._last_disk_level = verdict.level
        if verdict.level == "ok":
            self.bus.emit(self.spec.name, "disk_guard", "free space is back above the margin")
        elif verdict.level == "warn":
            self.bus.emit(
                self.spec.name,
                "disk_guard",
                f"warning: {verdict.reason}",
                {"level": "warn", "free_bytes": verdict.free_bytes},
            )
        else:
            message = f"pausing the run: {verdict.reason}"
            self.bus.emit(
                self.spec.name,
                "disk_guard",
                message,
                {"level": "pause", "free_bytes": verdict.free_bytes},
            )
            self._on_disk_pause(message)

    def disk_verdict(self) -> DiskVerdict:
        """Warn below room for three checkpoints (or `min_free`); pause below two, so
        that the save a pause asks for still fits, with one checkpoint to spare."""
        last = self.last_size or self._newest_size()
        return check_disk(
            self.spec.output_dir,
            last,
            min_free=self.spec.checkpoint.min_free,
            margin=WARN_CHECKPOINTS,
            hard_floor=PAUSE_CHECKPOINTS * last if last else None,
        )

    def after_save(self, step: int) -> None:
        """A `checkpoint_saved` progress line: check the disk at once, not when the
        watcher has seen the folder settle (the next save may come sooner)."""
        usage = disk_usage(self.spec.output_dir / checkpoint_name(step))
        if usage:
            self.last_size = usage
            self._guard_disk()

    def preflight(self) -> tuple[str, str]:
        """Refuse to launch into a disk that cannot take the next checkpoint."""
        verdict = self.disk_verdict()
        if verdict.level == "pause":
            self._last_disk_level = "pause"
            return "wait", f"waiting for disk space: {verdict.reason}"
        return "ok", ""

    def _newest_size(self) -> int | None:
        rows = [r for r in self.store.checkpoints(self.spec.name) if r["valid"]]
        return rows[-1]["size_bytes"] if rows else None

    async def _rotate(self) -> None:
        keep = self.spec.checkpoint
        reports = await self._validate_all()
        if reports is None or not all(r.checked for r in reports):
            return  # delete nothing on a partial view; the next save tries again
        doomed = plan_retention(
            reports,
            keep_last=keep.keep_last,
            keep_every=keep.keep_every,
            keep_best=keep.keep_best,
            in_flight=set(),
        )
        if not doomed:
            return
        deleted: list[Path] = await asyncio.to_thread(apply_retention, doomed)
        if deleted:
            names = ", ".join(p.name for p in deleted)
            self.bus.emit(
                self.spec.name,
                "retention",
                f"deleted {names} (keep_last = {keep.keep_last})",
                {"deleted": [str(p) for p in deleted]},
            )
