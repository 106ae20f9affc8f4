"""The memory tier, daemon side (issue 18): which snapshot a restart may resume.

The built-in trainer keeps its newest training state in RAM
(`<memory dir>/slot-0|slot-1/checkpoint-<step>`, see the contract's MEMORY_*
names and `ftsup.trainer.memory_snapshot`), sealed by a record written last.
A kill then loses about one step instead of everything since the last disk
save.

A snapshot is only ever a faster way to the same state, so it is resumed only
when nothing about it can be wrong: sealed (its record lists every file with
its size: a write cut short has no record), newer than the newest valid disk
checkpoint, of this job, of the current lineage, written under exactly the
job's configuration (the record's fingerprint), and written since the host
last booted (the record's boot id: a `memory_dir` on a disk outlives a power
loss, and the pages of a snapshot's tensors need not have reached the disk
before its seal did). The lineage token
changes when a run starts anew and when the daemon rolls back on purpose (a
loss anomaly), so a snapshot of an abandoned line of training is never picked
even if its folder survived. Everything else (export, retention, a host
reboot, `ftsup ckpt`) knows only the disk checkpoints.

The memory folder is ftsup's own (in RAM: `memory_root`), or `[checkpoint]
memory_dir`; it is read in worker threads only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.atomicio import write_json_atomic
from ftsup.supervisor.contract import (
    ENV_RUNTIME_DIR,
    MEMORY_FORMAT,
    MEMORY_RECORD,
    MEMORY_SLOTS,
    checkpoint_step,
)
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.private_dirs import NotPrivate, ensure_private_dir
from ftsup.supervisor.spec import key_line
from ftsup.supervisor.spec_types import JobSpec, SpecIssue

log = logging.getLogger("ftsup.memory")

LINEAGE_FILE = "memory-lineage.json"
_RECORD_MAX = 64 * 1024
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    attempt: int | None
    size_bytes: int


# `auto`: a snapshot after every step where the state training changes is small
# (LoRA, QLoRA: adapter weights and their optimizer state, a few MB to a few
# hundred), off for a full fine-tune (weights and optimizer state, three times the
# model, twice over in RAM) until that is measured. The trainer spaces snapshots
# to keep their cost within its `max_overhead` (5% by default).
AUTO_EVERY = {"lora": 1, "qlora": 1, "full": 0}


def memory_every(spec: JobSpec) -> int:
    """Steps between snapshots; 0: no memory tier. Only a one-process [train] job
    has one; `auto` (the default) is AUTO_EVERY by fine-tuning type."""
    train = spec.train
    if train is None or spec.launch.distributed or spec.launch.deepspeed or spec.launch.fsdp:
        return 0
    every = spec.checkpoint.memory_every
    return AUTO_EVERY.get(train.finetuning_type, 0) if every is None else every


def memory_dir(spec: JobSpec, layout: Layout) -> Path:
    """The job's memory folder: `[checkpoint] memory_dir`/<job>, else
    `memory_root(runtime folder)`/<job> (one per daemon: two never share one)."""
    if spec.checkpoint.memory_dir:
        return Path(spec.checkpoint.memory_dir) / spec.name
    return memory_root(layout.runtime_dir) / spec.name


SHM = Path("/dev/shm")
RAM_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})


@functools.cache
def memory_root(runtime_dir: Path) -> Path:
    """Where a daemon keeps its jobs' snapshots: in RAM. Its runtime folder when that
    is tmpfs (systemd's /run/user/UID, /run/ftsup), else a private folder of this
    daemon's in /dev/shm. An on-demand daemon's runtime folder may be /tmp/ftsup-UID
    on a disk, where every snapshot (after every step or two) would also be written
    back to the disk for nothing: a snapshot is never resumed after a reboot (its
    record's boot id), so it only has to live as long as RAM does. Without a RAM
    file system it stays in the runtime folder. Looked up once per daemon
    (/proc/self/mounts). The chaos benchmark measured no difference in speed on its
    small job (docs/benchmarks.md)."""
    mounts = _mounts()
    if filesystem_type(runtime_dir, mounts) in RAM_FILE_SYSTEMS:
        return runtime_dir / "memory"
    if filesystem_type(SHM, mounts) in RAM_FILE_SYSTEMS:
        private = shm_folder(runtime_dir)
        try:
            ensure_private_dir(private, env_var=ENV_RUNTIME_DIR)
        except (OSError, NotPrivate) as exc:
            log.warning("memory snapshots stay in %s: %s", runtime_dir, exc)
        else:
            return private / "memory"
    return runtime_dir / "memory"


def memory_dir_warning(spec: JobSpec) -> SpecIssue | None:
    """A warning when `[checkpoint] memory_dir` is not in RAM and the job has a memory
    tier: every snapshot would also be written back to that disk, for a state no
    restart after a reboot resumes. Looked at by the CLI (`ftsup check`, `ftsup
    start`), on the daemon's host, never in the daemon: the path is the user's."""
    folder = spec.checkpoint.memory_dir
    if not folder or memory_every(spec) == 0:
        return None
    kind = filesystem_type(Path(folder))
    if kind is None or kind in RAM_FILE_SYSTEMS:
        return None
    key = ("checkpoint", "memory_dir")
    return SpecIssue(
        spec.source,
        key_line(spec.text, key),
        ".".join(key),
        f"{folder} is on {kind}, not in RAM: every memory snapshot would also be written "
        "back to that disk, and none is resumed after a reboot",
        "leave memory_dir out (the daemon keeps snapshots in RAM), or name a tmpfs folder "
        "such as /dev/shm/ftsup",
    )


def shm_folder(runtime_dir: Path) -> Path:
    """The /dev/shm folder of the daemon with this runtime folder (named after it, so
    two daemons never share one and a restarted daemon finds its snapshots)."""
    digest = hashlib.sha256(str(runtime_dir.absolute()).encode()).hexdigest()[:12]
    return SHM / f"ftsup-{os.geteuid()}-{digest}"


def _mounts() -> str | None:
    try:
        return Path("/proc/self/mounts").read_text()
    except OSError:
        return None


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system that holds `path` (it need not exist yet): the
    longest mount point above it in /proc/self/mounts (or `mounts`, in its format)."""
    if mounts is None:
        mounts = _mounts()
    if mounts is None:
        return None
    target = os.path.realpath(path)
    best: tuple[int, str | None] = (-1, None)
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")  # the kernel escapes spaces
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best[0]:
            best = (len(point), fields[2])
    return best[1]


def current_lineage(run_dir: Path) -> str:
    """The job's lineage token, created on first use. A folder that cannot be
    written gives a token of this process alone: no older snapshot can match it,
    so the tier starts afresh rather than risk a wrong resume."""
    path = run_dir / LINEAGE_FILE
    try:
        token = json.loads(path.read_text()).get("lineage")
        if isinstance(token, str) and token:
            return token
    except (OSError, ValueError, AttributeError):
        pass
    return new_lineage(run_dir)


def new_lineage(run_dir: Path) -> str:
    """A new token: every snapshot written so far belongs to an abandoned line."""
    token = secrets.token_hex(8)
    try:
        write_json_atomic(run_dir / LINEAGE_FILE, {"lineage": token})
    except OSError as exc:
        log.warning("cannot record the memory lineage in %s: %s", run_dir, exc)
    return token


def newest_usable(
    folder: Path,
    *,
    job: str,
    lineage: str,
    fingerprint: dict[str, Any],
    newer_than: int,
) -> Snapshot | None:
    """The newest sealed snapshot that may be resumed, or None.

    `newer_than`: the newest valid disk checkpoint's step (-1: none); a snapshot
    of that step or older is never used (the disk checkpoint is the same state,
    and the one everything else knows)."""
    found: list[Snapshot] = []
    for slot in MEMORY_SLOTS:
        try:
            entries = sorted((folder / slot).iterdir())
        except OSError:
            continue
        for path in entries:
            step = checkpoint_step(path)
            if step is None or step <= newer_than:
                continue
            snapshot = _usable(path, step, job, lineage, fingerprint)
            if snapshot is not None:
                found.append(snapshot)
    return max(found, key=lambda s: s.step, default=None)


@functools.cache
def boot_id() -> str | None:
    """This boot of the host (the kernel's random boot id), or None where it cannot be
    read. Written into every snapshot's record by the trainer and compared by the
    daemon: RAM does not outlive a boot, so neither may a snapshot."""
    try:
        return BOOT_ID_FILE.read_text().strip() or None
    except OSError:
        return None


def read_record(folder: Path) -> dict[str, Any] | None:
    """A snapshot's seal (MEMORY_RECORD), or None: unsealed (a write cut short),
    unreadable, or not a snapshot. The trainer reads it the same way."""
    try:
        with open(Path(folder) / MEMORY_RECORD, "rb") as handle:
            record = json.loads(handle.read(_RECORD_MAX))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _usable(
    path: Path, step: int, job: str, lineage: str, fingerprint: dict[str, Any]
) -> Snapshot | None:
    record = read_record(path)
    if record is None or record.get("format") != MEMORY_FORMAT:
        return None
    if (record.get("job"), record.get("lineage"), record.get("step")) != (job, lineage, step):
        return None
    if record.get("fingerprint") != dict(fingerprint):
        return None
    if record.get("boot") != boot_id():  # sealed before a reboot: its pages may be lost
        return None
    sizes = record.get("files")
    if not isinstance(sizes, dict) or not sizes:
        return None
    for name, expected in sizes.items():
        try:
            if not isinstance(expected, int) or os.stat(path / name).st_size != expected:
                return None
        except (OSError, ValueError):
            return None
    attempt = record.get("attempt")
    return Snapshot(path, step, attempt if isinstance(attempt, int) else None, sum(sizes.values()))


def discard(folder: Path) -> None:
    """Remove the job's snapshots in the background (best effort): a run that
    ended, or a line of training abandoned on purpose, frees its memory."""
    threading.Thread(
        target=shutil.rmtree,
        args=(folder,),
        kwargs={"ignore_errors": True},
        name="ftsup-memory-discard",
        daemon=True,
    ).start()


__all__ = [
    "LINEAGE_FILE",
    "Snapshot",
    "boot_id",
    "current_lineage",
    "discard",
    "filesystem_type",
    "memory_dir",
    "memory_dir_warning",
    "memory_every",
    "memory_root",
    "new_lineage",
    "newest_usable",
    "read_record",
    "shm_folder",
]
