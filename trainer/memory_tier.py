"""The memory tier (issue 18): the newest training state in RAM, a step old at most.

Disk checkpoints come every `save_steps`; a kill loses everything since the
last one. Here, after every `every`-th optimizer step, the trainer also writes
its complete state (trainable weights, optimizer, scheduler, scaler, RNG,
trainer state with the step, i.e. the data position) into
`<dir>/slot-0|slot-1/checkpoint-<step>` (tmpfs), in the format of
`ftsup.trainer.memory_snapshot`: a memcpy into a mapped file plus a few KB of
pickle, on the training thread, then sealed by its record. A first version
wrote an HF checkpoint folder from a background thread; its Python held the
GIL for 15-25 ms per snapshot and made every step of the tiny LoRA job about
1.8x slower. A later one copied the tensors on a writer thread (the GIL released
during the copy): the stall the training thread saw halved, the steps did not get
faster, because most of what the copy costs is what it does to the caches the
step uses, wherever it runs (docs/benchmarks.md, "The snapshot's cost"). The
daemon resumes a snapshot (`--resume-from`) when it is newer
than the newest valid disk checkpoint; the trainer turns it back into an HF
checkpoint folder and HF's `resume_from_checkpoint` loads that.

Two slots: a write always goes into the slot that does not hold the newest
sealed snapshot (at start: the one resumed from, else the highest sealed
step), and unseals its target first, so some sealed snapshot survives a kill
at any moment. With `max_overhead` set, snapshots are spaced so that their
cost stays within that fraction of the training time, judged by the median
cost of the recent writes, never the attempt's first write alone (it pays
one-time costs) nor one write the machine slowed down. A write that fails (a
full /dev/shm, a folder in the way) is reported once and turns the tier off
for the rest of the attempt; training goes on. One process only (every
rank's RNG would be needed otherwise); not with DeepSpeed or FSDP.
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import (
    ENV_ATTEMPT,
    ENV_MEMORY_LINEAGE,
    MEMORY_RECORD,
    MEMORY_SLOTS,
    PROGRESS_MEMORY_SNAPSHOT,
    checkpoint_name,
    checkpoint_step,
)
from ftsup.supervisor.memory_tier import boot_id, read_record
from ftsup.trainer.async_save import plain_layout_models
from ftsup.trainer.memory_snapshot import SlotHistory, SnapshotWriter, restore_loss_window

# A progress line: (event, **fields), e.g. FtsupCallback.report.
Report = Callable[..., None]
# Fault injection (tests): (step, point).
PointHook = Callable[[int, str], None]
# Writes and seals a snapshot: (folder, slot history or None, record, fault hook)
# -> (bytes, slot history). SnapshotWriter.write with the trainer bound.
Write = Callable[
    [Path, SlotHistory | None, Mapping[str, Any], Callable[[str], None]],
    tuple[int, SlotHistory],
]

# The most of training's time the tier may take (train.json `memory.max_overhead`):
# a snapshot is skipped until the recent snapshots' median cost is at most this
# share of the time since. 0 spaces nothing: a snapshot every `every` steps. 5% is
# issue 18's bound on the snapshot stall, and on the demo's LoRA job (2 cores, a
# ~1.1 ms stall of a ~30 ms step) it gives a snapshot after every step, so a kill
# recomputes one step at most (none in 24 kills on the chaos benchmark; 0.025 gave
# every other step and 5-7 per 12 kills). On a CPU a snapshot also slows the steps
# around it about as much as it stalls (docs/benchmarks.md, "The default budget,
# session 14").
DEFAULT_MAX_OVERHEAD = 0.05
PACING_WINDOW = 5  # writes whose median cost spaces the next one


def pacing_delay(stalls: Sequence[float], max_overhead: float) -> float:
    """Seconds from one write to the next so that writes take `max_overhead` of the
    time, by the median of the recent writes' `stalls`: one write slowed by the
    machine (a preempted thread, a page-cache miss) must not pause the tier for
    twenty times as long (0.4 s at 5% is 8 s, a whole short run of no snapshot)."""
    if max_overhead <= 0 or not stalls:
        return 0.0
    return statistics.median(stalls) / max_overhead


def slot_folders(slot_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each `checkpoint-<step>` in a slot, sealed or not."""
    try:
        return _checkpoint_folders(list(slot_dir.iterdir()))
    except OSError:
        return []


def _checkpoint_folders(entries: list[Path]) -> list[tuple[int, Path]]:
    found = [(checkpoint_step(path), path) for path in entries]
    return sorted((step, path) for step, path in found if step is not None)


def newest_slot(folder: Path, resumed_from: Path | None = None) -> int | None:
    """The slot that must survive the next write: the one resumed from, else the one
    holding the highest sealed step; None when neither holds a sealed snapshot."""
    if resumed_from is not None:
        parent = Path(resumed_from).resolve().parent
        for index, name in enumerate(MEMORY_SLOTS):
            if parent == (Path(folder) / name).resolve():
                return index
    best: tuple[int, int] | None = None
    for index, name in enumerate(MEMORY_SLOTS):
        for step, path in slot_folders(Path(folder) / name):
            if read_record(path) is not None and (best is None or step > best[0]):
                best = (step, index)
    return None if best is None else best[1]


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value else None
    except ValueError:
        return None


class MemoryTier:
    """Snapshots into alternating slots, on the training thread."""

    def __init__(
        self,
        folder: Path,
        every: int,
        *,
        job: str,
        fingerprint: Mapping[str, Any],
        resumed_from: Path | None = None,
        on_point: PointHook | None = None,
        report: Report | None = None,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
    ) -> None:
        """`max_overhead`: snapshots are spaced so that their cost stays below this
        fraction of the time (0: every due step)."""
        self.folder = Path(folder)
        self.max_overhead = max_overhead
        self.paced = 0  # snapshots not taken to keep within max_overhead
        self._next_at = 0.0  # time.monotonic() before which no snapshot is taken
        self._stalls: deque[float] = deque(maxlen=PACING_WINDOW)  # after the first write
        self._first_written = False
        self.every = max(1, every)
        self.job = job
        self.fingerprint = dict(fingerprint)
        self.lineage = os.environ.get(ENV_MEMORY_LINEAGE) or None
        self.attempt = _env_int(ENV_ATTEMPT)
        self.on_point = on_point
        self.report = report
        self.enabled = True
        self.sealed = 0
        self.error: str | None = None
        self.newest = newest_slot(self.folder, resumed_from)
        self._last_step = -1
        self._writer = SnapshotWriter()
        # Each slot's folder as this attempt last renamed it (no listing after the first).
        self._slot_folders: dict[int, Path] = {}
        # How much of the log history this attempt wrote into each slot's file.
        self._history: dict[int, SlotHistory] = {}

    def due(self, step: int, max_steps: int) -> bool:
        """Whether step `step` gets a snapshot (once per step; never the last step,
        which HF saves to disk anyway)."""
        return (
            self.enabled
            and 0 < step < max_steps
            and step != self._last_step
            and step % self.every == 0
        )

    def snapshot(self, trainer: Any) -> None:
        """Write the trainer's state into the other slot and seal it (or skip it,
        to keep within `max_overhead`)."""
        self.submit(trainer.state.global_step, functools.partial(self._writer.write, trainer))

    def submit(self, step: int, write: Write) -> bool:
        """Write snapshot `step` with `write` (False: not taken, paced or off)."""
        self._last_step = step
        if not self.enabled:
            return False
        taken_at = time.monotonic()
        if taken_at < self._next_at:
            self.paced += 1
            return False
        started = time.perf_counter()
        target = 0 if self.newest != 0 else 1
        try:
            folder = self._unsealed_folder(target, step)
            size, history = write(
                folder,
                self._history.get(target),
                self._record(step),
                lambda point: self._point(step, point),
            )
        except Exception as exc:  # never end training over the memory tier
            self._history.pop(target, None)
            self.fail(step, exc)
            return False
        self._history[target] = history
        stall = time.perf_counter() - started
        if self._first_written:  # the first allocates the slot's files: not a measure
            self._stalls.append(stall)
            self._next_at = taken_at + pacing_delay(self._stalls, self.max_overhead)
        self._first_written = True
        self.newest = target
        self.sealed += 1
        self._emit(
            step=step,
            bytes=size,
            stall_s=round(stall, 6),
            slot=MEMORY_SLOTS[target],
            paced=self.paced,
        )
        return True

    def _unsealed_folder(self, target: int, step: int) -> Path:
        """The target slot's folder, unsealed (the record goes first: a kill from
        here on leaves it unusable) and renamed to `step`; anything else there goes.
        A slot this attempt wrote before is known: no listing."""
        folder = self.folder / MEMORY_SLOTS[target] / checkpoint_name(step)
        known = self._slot_folders.get(target)
        if known is None or not self._unseal_known(known, folder):
            self._list_and_unseal(target, folder)
        self._slot_folders[target] = folder
        return folder

    def _unseal_known(self, known: Path, folder: Path) -> bool:
        """Unseal and rename the folder this attempt last wrote in a slot; False when
        it is not as this attempt left it (then the slot is looked at)."""
        try:
            os.unlink(known / MEMORY_RECORD)
            if known != folder:
                os.rename(known, folder)
                self._writer.moved(known, folder)
        except OSError:
            return False
        return True

    def _list_and_unseal(self, target: int, folder: Path) -> None:
        slot_dir = self.folder / MEMORY_SLOTS[target]
        entries = _entries(slot_dir)
        existing = _checkpoint_folders(entries)
        keep = existing[-1][1] if existing else None
        if keep is not None:
            (keep / MEMORY_RECORD).unlink(missing_ok=True)
        for entry in entries:
            if entry != keep:
                self._writer.forget(entry)
                _remove(entry)
        if keep is None:
            folder.mkdir(parents=True)
        elif keep != folder:
            keep.rename(folder)
            self._writer.moved(keep, folder)

    def _record(self, step: int) -> dict[str, Any]:
        return {
            "job": self.job,
            "lineage": self.lineage,
            "step": step,
            "attempt": self.attempt,
            "created_at": time.time(),
            "fingerprint": self.fingerprint,
            "boot": boot_id(),
        }

    def turn_off(self, step: int, why: str) -> None:
        """Off for the rest of the attempt, said once (stderr and a progress line)."""
        if self.enabled:
            self.enabled = False
            self.error = why
            print(f"ftsup trainer: memory tier off: {why}", file=sys.stderr, flush=True)
            self._emit(step=step, error=why)

    def _point(self, step: int, point: str) -> None:
        if self.on_point is not None:
            self.on_point(step, point)  # fault injection (tests)

    def fail(self, step: int, exc: BaseException) -> None:
        """Report a failure once (stderr and a progress line) and turn the tier off."""
        if not self.enabled:
            return
        self.enabled = False
        self.error = f"{type(exc).__name__}: {exc}"
        print(
            f"ftsup trainer: memory tier off for this attempt: snapshot of step {step} "
            f"in {self.folder} failed ({self.error}); training goes on",
            file=sys.stderr,
            flush=True,
        )
        self._emit(step=step, error=self.error)

    def _emit(self, **fields: Any) -> None:
        if self.report is not None:
            self.report(PROGRESS_MEMORY_SNAPSHOT, **fields)


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def memory_tier_unsupported(trainer: Any) -> str | None:
    """Why this trainer cannot keep a memory tier, or None."""
    if trainer.args.world_size > 1:
        return "more than one process (every rank's RNG state would be needed)"
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return "DeepSpeed and FSDP checkpoints are sharded"
    if not isinstance(trainer.model, plain_layout_models()):
        return f"{type(trainer.model).__name__} is not a PreTrainedModel or PeftModel"
    return None


def with_memory_tier(trainer_class: Any, tier: MemoryTier) -> Any:
    """A subclass of `trainer_class` that snapshots into `tier` after each due step.

    The snapshot follows the step's logging and evaluation, so it holds what a disk
    checkpoint of that step would. A step that saves to disk takes it first, at
    the start of `_save_checkpoint`, where HF's own save reads the same state: a
    kill during the disk save (its stall, its background write, its seal) then
    resumes that step's snapshot instead of recomputing the step (the chaos
    benchmark's save-timed kills lost one each). Other steps take it after
    `_maybe_log_save_evaluate`. One snapshot per step: the end-of-epoch call (same
    step, another moment) takes none.
    """

    class MemoryTierTrainer(trainer_class):  # type: ignore[misc,valid-type]
        def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
            super()._maybe_log_save_evaluate(*args, **kwargs)
            self._ftsup_snapshot()

        def _save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
            self._ftsup_snapshot()
            super()._save_checkpoint(*args, **kwargs)

        def _ftsup_snapshot(self) -> None:
            if not tier.due(self.state.global_step, self.state.max_steps):
                return
            why = memory_tier_unsupported(self)
            if why is not None:
                tier.turn_off(self.state.global_step, why)
                return
            tier.snapshot(self)

        def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
            restore_loss_window(self)  # after HF reset it, before the first step
            return super()._run_epoch(*args, **kwargs)

    MemoryTierTrainer.__name__ = MemoryTierTrainer.__qualname__ = (
        f"MemoryTier{trainer_class.__name__}"
    )
    return MemoryTierTrainer


__all__ = [
    "MemoryTier",
    "memory_tier_unsupported",
    "newest_slot",
    "with_memory_tier",
]
