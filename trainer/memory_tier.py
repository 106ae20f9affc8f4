"""The memory tier (issue 18): the newest training state as a checkpoint folder in RAM.

Disk checkpoints come every `save_steps`; a kill loses everything since the
last one. Here, after every `every`-th optimizer step, the trainer also copies
its complete state (trainable weights, optimizer, scheduler, scaler, RNG,
trainer state with the step, i.e. the data position) into host buffers of its
own, and a background thread writes it as an ordinary HF checkpoint folder
into `<dir>/slot-0|slot-1/checkpoint-<step>` (tmpfs), with the same files and
formats as an asynchronous disk save (`async_save.capture` / `write_files`),
plus `ftsup-memory.json` (job, lineage, step, attempt), then seals it with the
same manifest. Resuming from it is therefore HF's own
`resume_from_checkpoint`, bit-identical by construction; the daemon picks it
(`--resume-from`) when it is newer than the newest valid disk checkpoint.

Two slots: a write always goes into the slot that does not hold the newest
sealed snapshot (at start: the one resumed from, else the highest sealed
step), and unseals its target first (manifest, then files), so some sealed
snapshot survives a kill at any moment. Training never waits for the tier: a
snapshot due while the previous write runs is skipped (and counted), and
with `max_overhead` set, snapshots are spaced so that their cost (the
capture, plus the writer's CPU, whose Python holds the GIL the training loop
needs) stays within `max_overhead` of the training time. A write that fails (a full /dev/shm, a
folder in the way) is reported once and turns the tier off for the rest of
the attempt; training goes on. One process only
(every rank's RNG would be needed otherwise); not with DeepSpeed or FSDP.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import (
    ENV_ATTEMPT,
    ENV_MEMORY_LINEAGE,
    MEMORY_RECORD,
    MEMORY_SLOTS,
    PROGRESS_MEMORY_SNAPSHOT,
    checkpoint_name,
)
from ftsup.supervisor.manifest import MANIFEST_NAME, build_manifest, write_manifest
from ftsup.trainer import faults
from ftsup.trainer.async_save import (
    RNG_STATE_NAME,
    HostBuffers,
    PartRunner,
    capture,
    plain_layout_models,
    rng_states,
    write_files,
)
from ftsup.trainer.checkpointing import PointHook, is_complete, list_checkpoints

# Writes a snapshot's files (all but record and manifest) into the folder it is given.
SnapshotWriter = Callable[[Path, PartRunner], None]
# A progress line: (event, **fields), e.g. FtsupCallback.report.
Report = Callable[..., None]
README_NAME = "README.md"  # peft's model card, part of an adapter checkpoint


# The most of training's time the tier may take (train.json `memory.max_overhead`):
# the capture on the training thread plus the writer's CPU (its Python holds the GIL
# the training loop needs). 0, the default, spaces nothing: a snapshot every `every`
# steps unless a write still runs. Measured on the tiny LoRA job (2 cores), a write
# every step cost 15-25 ms against a 25 ms step (training about 1.8x slower); 0.05
# brought it to a snapshot every ~12 steps and a ~4% longer mean step.
DEFAULT_MAX_OVERHEAD = 0.0


@dataclass(frozen=True)
class _Job:
    step: int
    write: SnapshotWriter
    stall_s: float
    taken_at: float  # time.monotonic() when the capture began


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
        for step, path in list_checkpoints(Path(folder) / name):
            if is_complete(path) and (best is None or step > best[0]):
                best = (step, index)
    return None if best is None else best[1]


def unseal(slot_dir: Path) -> None:
    """Empty a slot: every manifest first (a kill midway leaves nothing sealed), then files."""
    if not slot_dir.is_dir():
        return
    entries = sorted(slot_dir.iterdir())
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            (entry / MANIFEST_NAME).unlink(missing_ok=True)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_record(path: Path, record: Mapping[str, Any]) -> None:
    """MEMORY_RECORD: which job, lineage, step and attempt the snapshot belongs to."""
    path.write_text(json.dumps(dict(record)))


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder`."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _dirs, files in os.walk(folder)
        for name in files
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value else None
    except ValueError:
        return None


class MemoryTier:
    """Snapshots on the training thread, writes and seals on its own worker thread."""

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
        fraction of the time (0: every due step, only skipped while a write runs)."""
        self.folder = Path(folder)
        self.max_overhead = max_overhead
        self.paced = 0  # snapshots not taken to keep within max_overhead
        self._next_at = 0.0  # time.monotonic() before which no snapshot is taken
        self.every = max(1, every)
        self.job = job
        self.fingerprint = dict(fingerprint)
        self.lineage = os.environ.get(ENV_MEMORY_LINEAGE) or None
        self.attempt = _env_int(ENV_ATTEMPT)
        self.on_point = on_point
        self.report = report
        self.enabled = True
        self.skipped = 0  # snapshots not taken because the previous write still ran
        self.sealed = 0
        self.error: str | None = None
        self.newest = newest_slot(self.folder, resumed_from)
        self._buffers: HostBuffers | None = None
        self._last_step = -1
        self._idle = threading.Event()
        self._idle.set()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        # The worker's own: what the previous snapshot of this attempt can lend the next.
        self._sealed: Path | None = None
        self._tokenizer_names: tuple[str, ...] = ()
        self._readme: bytes | None = None

    # ------------------------------------------------------ training thread

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
        """Capture the trainer's state now and hand the write to the worker."""
        step = trainer.state.global_step
        self._last_step = step
        if not self._claim():
            return
        taken_at = time.monotonic()
        started = time.perf_counter()
        try:
            if trainer.hp_search_backend is None:
                trainer.store_flos()  # as before a disk save: total_flos is current
            if self._buffers is None:
                import torch

                self._buffers = HostBuffers(pin=torch.cuda.is_available())
            captured = capture(trainer, self._buffers)
            rng = rng_states(trainer)
        except Exception as exc:  # never end training over the memory tier
            self._idle.set()
            self.fail(step, exc)
            return

        def write(folder: Path, part: PartRunner) -> None:
            import torch

            write_files(captured, folder, part, save_tokenizer=self._save_tokenizer)
            part(None, lambda: torch.save(rng, folder / RNG_STATE_NAME))

        self._start(_Job(step, write, time.perf_counter() - started, taken_at))

    def submit(self, step: int, write: SnapshotWriter, *, stall_s: float = 0.0) -> bool:
        """Write a snapshot of `step` with `write` (False: skipped, a write is running)."""
        self._last_step = step
        if not self._claim():
            return False
        self._start(_Job(step, write, stall_s, time.monotonic()))
        return True

    def turn_off(self, step: int, why: str) -> None:
        """Off for the rest of the attempt, said once (stderr and a progress line)."""
        if self.enabled:
            self.enabled = False
            self.error = why
            print(f"ftsup trainer: memory tier off: {why}", file=sys.stderr, flush=True)
            self._emit(step=step, error=why, skipped=self.skipped)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until no write is in flight (False: still writing after `timeout`)."""
        return self._idle.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Let the write in flight finish, then stop the worker (end of training)."""
        self.wait_idle(timeout)
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout)
            self._worker = None

    def _claim(self) -> bool:
        if not self.enabled:
            return False
        if not self._idle.is_set():
            self.skipped += 1  # never stall training for the memory tier
            return False
        if time.monotonic() < self._next_at:
            self.paced += 1
            return False
        self._idle.clear()
        return True

    def _start(self, job: _Job) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="ftsup-memory", daemon=True)
            self._worker.start()
        self._queue.put(job)

    # -------------------------------------------------------- worker thread

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._write(job)
            except Exception as exc:
                self.fail(job.step, exc)
            finally:
                self._idle.set()

    def _write(self, job: _Job) -> None:
        started = time.perf_counter()
        cpu = time.thread_time()
        target = 0 if self.newest != 0 else 1
        slot_dir = self.folder / MEMORY_SLOTS[target]
        unseal(slot_dir)
        folder = slot_dir / checkpoint_name(job.step)
        folder.mkdir(parents=True)
        if self._readme is not None:
            # peft then updates this model card instead of rendering it from its
            # template (36 of its 51 ms per save on the tiny model): same bytes.
            (folder / README_NAME).write_bytes(self._readme)
        delay = faults.write_delay()

        def part(point: str | None, action: Callable[[], object]) -> None:
            if delay:
                time.sleep(delay)
            action()
            if point is not None:
                self._point(job.step, f"memory_{point}")

        try:
            job.write(folder, part)
            record = {
                "job": self.job,
                "lineage": self.lineage,
                "step": job.step,
                "attempt": self.attempt,
                "created_at": time.time(),
            }
            part(None, lambda: write_record(folder / MEMORY_RECORD, record))
            self._point(job.step, "memory_before_seal")
            manifest = build_manifest(
                folder,
                step=job.step,
                world_size=1,
                fingerprint=self.fingerprint,
                created_at=time.time(),
                # In RAM: checksumming at the seal, in one walk and one thread,
                # costs less than a thread pool or a walk after every file.
                threads=1,
            )
            write_manifest(folder, manifest)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # unsealed anyway: free the memory
            raise
        cost = job.stall_s + time.thread_time() - cpu
        if self.max_overhead > 0:
            self._next_at = job.taken_at + cost / self.max_overhead
        self.newest = target
        self.sealed += 1
        self._sealed = folder
        readme = folder / README_NAME
        self._readme = readme.read_bytes() if readme.is_file() else None
        self._emit(
            step=job.step,
            bytes=folder_bytes(folder),
            stall_s=round(job.stall_s, 6),
            write_s=round(time.perf_counter() - started, 6),
            slot=MEMORY_SLOTS[target],
            skipped=self.skipped,
            paced=self.paced,
        )

    def _save_tokenizer(self, tokenizer: Any, folder: Path) -> None:
        """The tokenizer's files: hard links to the previous snapshot's (nothing ever
        writes into a snapshot's file again, and a slot is emptied by unlinking),
        else `save_pretrained`, whose files the next snapshot then links."""
        previous, names = self._sealed, self._tokenizer_names
        if previous is not None and names:
            try:
                for name in names:
                    os.link(previous / name, folder / name)
                return
            except OSError:
                for name in names:
                    (folder / name).unlink(missing_ok=True)
        before = set(os.listdir(folder))
        tokenizer.save_pretrained(str(folder))
        added = set(os.listdir(folder)) - before
        # Only plain files at the top (a nested layout is written afresh every time).
        self._tokenizer_names = tuple(sorted(n for n in added if (folder / n).is_file()))
        if len(self._tokenizer_names) != len(added):
            self._tokenizer_names = ()

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
        self._emit(step=step, error=self.error, skipped=self.skipped)

    def _emit(self, **fields: Any) -> None:
        if self.report is not None:
            self.report(PROGRESS_MEMORY_SNAPSHOT, **fields)


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

    The hook follows `_maybe_log_save_evaluate`, so a disk save of the same step
    comes first and the snapshot sees the state a disk checkpoint would hold. Its
    end-of-epoch call (same step, another moment) is never snapshotted.
    """

    class MemoryTierTrainer(trainer_class):  # type: ignore[misc,valid-type]
        def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
            super()._maybe_log_save_evaluate(*args, **kwargs)
            if not tier.due(self.state.global_step, self.state.max_steps):
                return
            why = memory_tier_unsupported(self)
            if why is not None:
                tier.turn_off(self.state.global_step, why)
                return
            tier.snapshot(self)

        def train(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().train(*args, **kwargs)
            finally:
                tier.close()

    MemoryTierTrainer.__name__ = MemoryTierTrainer.__qualname__ = (
        f"MemoryTier{trainer_class.__name__}"
    )
    return MemoryTierTrainer


__all__ = [
    "MemoryTier",
    "memory_tier_unsupported",
    "newest_slot",
    "unseal",
    "with_memory_tier",
]
