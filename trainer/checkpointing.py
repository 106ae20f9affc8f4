"""After Hugging Face saved a checkpoint: the manifest, rotation, and stale folders.

HF Trainer writes `checkpoint-<step>/`; this module makes it *complete* by
writing `ftsup-manifest.json` last (through `ftsup.supervisor.manifest`), and
only then rotates old checkpoints, so the newest complete checkpoint is never
deleted. Hashing a large checkpoint takes a while, so it can run on a worker
thread while training goes on (`async_save`). The built-in trainer's
asynchronous save (`ftsup.trainer.async_save`) also hands its file writing to
that thread (`Checkpointer.submit`), so the files are written, then sealed,
strictly in order. Stdlib only: the supervisor may import it.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import checkpoint_step
from ftsup.supervisor.fingerprint import train_fingerprint
from ftsup.supervisor.manifest import (
    MANIFEST_NAME,
    ManifestError,
    build_manifest,
    entry_for,
    iter_checkpoint_files,
    read_manifest,
    write_manifest,
    write_part,
)

# (checkpoint folder, step, seconds from the save's start to its manifest,
#  seconds training was blocked by it)
SavedHook = Callable[[Path, int, float, float], None]
# (step, point): the fault injector's hook (`ftsup.trainer.faults`), e.g. "before_manifest"
PointHook = Callable[[int, str], None]
_Item = tuple[str, Path, int, Any, float | None]


# What must not change across a resume for it to be exact: one definition for both
# sides, so that the daemon's drift guard compares like with like.
fingerprint = train_fingerprint


def hand_over_rank_shards(ckpt_dir: Path, rank: int) -> int:
    """A rank's own shards (DeepSpeed's `*_rank_<rank>_*`, DCP's `__<rank>_<n>.distcp`),
    checksummed by that rank right after it wrote them and handed to rank 0's seal
    (a manifest part), so the seal only assembles instead of reading every rank's
    bytes. Returns the count."""
    own = re.compile(rf"(?:^|_)rank_{rank}_|^__{rank}_\d+\.distcp$")
    if not Path(ckpt_dir).is_dir():
        return 0
    files = [f for f in iter_checkpoint_files(Path(ckpt_dir)) if own.search(f.name)]
    if files:
        write_part(Path(ckpt_dir), f"rank-{rank}", [entry_for(Path(ckpt_dir), f) for f in files])
    return len(files)


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """`checkpoint-<step>` folders, oldest step first."""
    found = []
    if Path(output_dir).is_dir():
        for entry in Path(output_dir).iterdir():
            step = checkpoint_step(entry)
            if step is not None and entry.is_dir():
                found.append((step, entry))
    return sorted(found)


def is_complete(ckpt_dir: Path, *, verify_sizes: bool = True) -> bool:
    """A manifest that parses, names this step and (optionally) matches file sizes."""
    try:
        manifest = read_manifest(Path(ckpt_dir))
    except ManifestError:
        return False
    if manifest.step != checkpoint_step(ckpt_dir):
        return False
    if verify_sizes:
        for entry in manifest.files:
            file = Path(ckpt_dir) / entry.path
            if not file.is_file() or file.stat().st_size != entry.size:
                return False
    return True


def newest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint a resume should use: the highest step with a valid manifest."""
    for _step, path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
    return None


def retire_checkpoints_after(output_dir: Path, step: int) -> list[Path]:
    """Rename every `checkpoint-N` with N > step out of the way (never delete).

    A run that resumes from step k (or starts over, k = 0) will write those
    steps again; leftovers from the abandoned attempt, complete or not, must
    neither be mixed into the new folders nor be picked as "newest" later.
    """
    retired = []
    stamp = int(time.time())
    for ckpt_step, path in list_checkpoints(output_dir):
        if ckpt_step <= step:
            continue
        reason = "superseded" if is_complete(path) else "invalid-incomplete"
        target = path.with_name(f"{path.name}.{reason}-{stamp}")
        os.replace(path, target)
        retired.append(target)
    return retired


def rotate(output_dir: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep` complete ones.

    Incomplete folders are left alone: they are not ours to judge (the
    supervisor quarantines them), and deleting by step number only ever
    touches folders whose manifest says they were finished.
    """
    keep = max(keep, 1)
    complete = [(step, path) for step, path in list_checkpoints(output_dir) if is_complete(path)]
    doomed = [path for _step, path in complete[:-keep]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


class Checkpointer:
    """Writes the manifest of each saved checkpoint, then rotates; optionally on a thread.

    Checkpoints are finalised strictly in order (one worker), so rotation for
    step N never runs before the manifest of step N is on disk. Background
    writes (`submit`) go through the same worker, so a checkpoint's manifest
    always follows its files; a failed write is never sealed.
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        fingerprint: Mapping[str, Any],
        world_size: int = 1,
        keep: int | None = None,
        async_save: bool = False,
        on_saved: SavedHook | None = None,
        on_point: PointHook | None = None,
        ranks: tuple[int, ...] | None = None,
    ) -> None:
        """`ranks`: the ranks whose files each checkpoint folder holds, when it is a
        node's own copy (`save_on_each_node`): written into its manifest."""
        self.output_dir = Path(output_dir)
        self.ranks = ranks
        self.fingerprint = dict(fingerprint)
        self.world_size = world_size
        self.keep = keep
        self.async_save = async_save
        self.on_saved = on_saved
        self.on_point = on_point
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        self._failed: set[Path] = set()

    def submit(self, ckpt_dir: Path, step: int, write: Callable[[], None]) -> None:
        """Run `write` (the checkpoint's files) on the worker, before its manifest."""
        self._raise_pending()
        self._put(("write", Path(ckpt_dir), step, write, None))

    def finalize(
        self, ckpt_dir: Path, step: int, started: float, *, stall_s: float | None = None
    ) -> None:
        """Manifest + rotation for a folder whose files are written (or queued before it).

        `stall_s` is how long training was blocked by this save; None means the
        whole save (it is measured here, since the manifest is written now).
        """
        self._raise_pending()
        if not self.async_save:
            self._finalize_now(Path(ckpt_dir), step, started, stall_s)
            return
        self._put(("seal", Path(ckpt_dir), step, started, stall_s))

    def wait_idle(self) -> None:
        """Block until every queued write and manifest is done (at most one save in flight)."""
        if self._worker is not None:
            self._queue.join()
        self._raise_pending()

    def wait(self) -> None:
        """Block until every queued checkpoint has its manifest (before exiting)."""
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        self._raise_pending()

    def _put(self, item: _Item) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="ftsup-checkpoint", daemon=True)
            self._worker.start()
        self._queue.put(item)

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._handle(item)
            finally:
                self._queue.task_done()

    def _handle(self, item: _Item) -> None:
        kind, ckpt_dir, step, payload, stall_s = item
        try:
            if kind == "write":
                payload()
            elif ckpt_dir in self._failed:
                self._failed.discard(ckpt_dir)  # its files are incomplete: never seal them
            else:
                self._finalize_now(ckpt_dir, step, payload, stall_s)
        except BaseException as exc:  # surfaced on the training thread
            print(f"ftsup: checkpoint {ckpt_dir} failed: {exc}", file=sys.stderr)
            if kind == "write":
                self._failed.add(ckpt_dir)
            self._error = exc

    def _finalize_now(
        self, ckpt_dir: Path, step: int, started: float, stall_s: float | None
    ) -> None:
        if self.on_point is not None:
            self.on_point(step, "before_manifest")
        manifest = build_manifest(
            ckpt_dir,
            step=step,
            world_size=self.world_size,
            fingerprint=self.fingerprint,
            created_at=time.time(),
            ranks=self.ranks,
        )
        write_manifest(ckpt_dir, manifest)
        if self.keep is not None:
            rotate(self.output_dir, self.keep)
        if self.on_saved is not None:
            seconds = time.monotonic() - started
            self.on_saved(ckpt_dir, step, seconds, seconds if stall_s is None else stall_s)


__all__ = [
    "MANIFEST_NAME",
    "Checkpointer",
    "fingerprint",
    "is_complete",
    "list_checkpoints",
    "newest_complete_checkpoint",
    "retire_checkpoints_after",
    "rotate",
]
