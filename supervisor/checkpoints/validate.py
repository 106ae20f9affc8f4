"""`validate_checkpoint`: the one question every other part asks of a folder.

Never imports torch: the fast path reads file headers, zip directories and
sizes only (milliseconds for multi-GB checkpoints); `deep` re-hashes against
the manifest or reads every zip member (CRC) and tensor byte range.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path

from ..manifest import MANIFEST_NAME
from ..userfiles import NotRegularFile
from .deepspeed import check_deepspeed, is_deepspeed
from .files import check_file, folder_stats
from .findings import Findings
from .formats import detect_format, looks_hf
from .fsdp import check_fsdp, is_fsdp
from .ftsup_format import QUARANTINE_NOTE, check_manifest
from .hf import TRAINER_STATE, check_hf, rng_world_size
from .report import CheckpointReport, Format, checkpoint_step


def validate_checkpoint(
    path: Path,
    *,
    deep: bool = False,
    world_size: int | None = None,
    require_manifest: bool = False,
    on_listed: Callable[[Path], None] | None = None,
    ranks: Collection[int] | None = None,
) -> CheckpointReport:
    """Judge one checkpoint folder.

    `world_size`: the number of processes that wrote it, when known (otherwise
    inferred from the RNG and optimizer files; a manifest's own value wins).
    `require_manifest`: the writer is known to write an ftsup manifest, so a
    folder without one is incomplete even if it looks like a good HF checkpoint.
    Raises FileNotFoundError / NotADirectoryError when `path` is not a folder,
    and FileNotFoundError when it disappears while being checked (a rotation
    deleting it is not a corrupt checkpoint). A read that fails for a reason
    outside the bytes gives a report with `checked=False`, never "invalid".
    `on_listed` is called once the folder's contents are listed (a test seam:
    it lets a test delete the folder mid-check deterministically). `ranks`: the
    ranks whose per-rank files the folder must hold, when it is a node-local copy
    (`save_on_each_node`); a manifest's own `ranks` wins. None: every rank.
    """
    folder = Path(path)
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(f"{folder} is not a folder")
        raise FileNotFoundError(f"{folder} does not exist")
    step = checkpoint_step(folder)
    found = Findings()
    fmt: Format = "unknown"
    listed: list[str] = []
    vanished = False
    try:
        listed = _listing(folder)
        if on_listed is not None:
            on_listed(folder)
        fmt = detect_format(folder, require_manifest=require_manifest)
        if fmt == "ftsup":
            _check_ftsup(folder, found, step, world_size, deep, ranks)
        elif fmt == "unknown":
            _check_unknown(folder, found)
        else:
            _check_layout(folder, found, step, world_size, deep, ranks)
    except FileNotFoundError:  # a file we listed went away mid-check
        vanished = True
    except NotRegularFile as exc:  # replaced by a FIFO, device... mid-check
        found.problem(str(exc))
    except OSError as exc:  # EMFILE, EACCES, EIO, ESTALE...: nothing known
        found.could_not_check(f"{exc.strerror or exc}: {exc.filename or folder}")
    if (vanished or found.problems) and _disappearing(folder, listed):
        raise FileNotFoundError(
            f"{folder} disappeared while being checked (deleted, e.g. by rotation)"
        )
    if vanished:
        found.problem("files vanished while being checked")
    if step is None and isinstance(found.details.get("global_step"), int):
        step = found.details["global_step"]
    return _report(folder, step, fmt, found)


def _listing(folder: Path) -> list[str]:
    """Every path below `folder` (relative), to tell later whether it is being deleted."""
    out: list[str] = []
    for root, dirs, files in os.walk(folder, onerror=_raise):
        rel = os.path.relpath(root, folder)
        out.extend(os.path.normpath(os.path.join(rel, name)) for name in [*dirs, *files])
    return out


def _raise(exc: OSError) -> None:
    raise exc


def _disappearing(folder: Path, listed: list[str]) -> bool:
    """The folder is gone, or something it held when checking began is: a deletion
    in progress (rmtree removes the files, then the folder), not corruption."""
    if not os.path.lexists(folder):
        return True
    return any(not os.path.lexists(folder / rel) for rel in listed)


def _check_ftsup(
    folder: Path,
    found: Findings,
    step: int | None,
    world_size: int | None,
    deep: bool,
    ranks: Collection[int] | None,
) -> None:
    manifest = check_manifest(folder, found, step=step, deep=deep)
    if manifest is None:
        _check_layout(folder, found, step, world_size, deep, ranks)
        return
    if world_size and world_size != manifest.world_size:
        found.note(f"written by {manifest.world_size} processes; the job runs {world_size}")
    if step is None:
        found.details["global_step"] = manifest.step
    # Hashes (deep) already cover every byte; the layout checks add the
    # structure that a manifest cannot know about, on the fast path only.
    # The writer knows which ranks' files its copy holds (node-local copies).
    held = manifest.ranks if manifest.ranks is not None else ranks
    _check_layout(folder, found, step, manifest.world_size, False, held)
    found.details["world_size"] = manifest.world_size


def _check_layout(
    folder: Path,
    found: Findings,
    step: int | None,
    world_size: int | None,
    deep: bool,
    ranks: Collection[int] | None = None,
) -> None:
    """Structure by writer: DeepSpeed and/or HF Trainer, else per-file integrity."""
    skip = frozenset([QUARANTINE_NOTE, *(p.name for p in folder.glob(f"{MANIFEST_NAME}*"))])
    deepspeed = is_deepspeed(folder)
    if deepspeed:
        if looks_hf(folder):  # a job's word of 1 (a [command] job) must not hide rank 1
            world_size = max(world_size or 0, rng_world_size(folder) or 0) or None
        check_deepspeed(folder, found, world_size=world_size, deep=deep)
        world_size = world_size or found.details.get("world_size")
    if is_fsdp(folder):  # FSDP's sharded state dicts (DCP folders) inside an HF checkpoint
        check_fsdp(folder, found, world_size=world_size, deep=deep)
    if looks_hf(folder):  # also an HF Trainer checkpoint made with DeepSpeed
        check_hf(
            folder,
            found,
            step=step,
            world_size=world_size,
            deep=deep,
            training_state_elsewhere=deepspeed,
            weights_elsewhere=deepspeed,
            skip_files=skip,
            ranks=ranks,
        )
    elif not deepspeed:
        for file in sorted(folder.rglob("*")):
            if (
                not file.is_dir()
                and file.name not in skip
                and (problem := check_file(file, deep=deep))
            ):
                found.problem(f"{file.relative_to(folder).as_posix()} {problem}")


def _check_unknown(folder: Path, found: Findings) -> None:
    if not any(folder.iterdir()):
        found.problem("empty folder (nothing written yet)")
    else:
        found.problem(
            f"not a known checkpoint: no {MANIFEST_NAME}, {TRAINER_STATE}, weights "
            "or DeepSpeed latest"
        )


def _report(folder: Path, step: int | None, fmt: Format, found: Findings) -> CheckpointReport:
    size, mtime = folder_stats(folder)
    valid = found.ok
    resumable = valid and not found.not_resumable
    if found.unchecked:
        reason: str | None = f"could not check: {found.unchecked[0]}"
    elif found.problems:
        reason = found.problems[0]
    elif found.not_resumable:
        reason = found.not_resumable[0]
    else:
        reason = None
    details = dict(found.details)
    details["problems"] = list(found.problems)
    details["notes"] = list(found.notes)
    if found.not_resumable:
        details["not_resumable"] = list(found.not_resumable)
    if found.unchecked:
        details["unchecked"] = list(found.unchecked)
    return CheckpointReport(
        path=folder,
        step=step,
        format=fmt,
        valid=valid,
        resumable=resumable,
        reason=reason,
        size_bytes=size,
        mtime=mtime,
        details=details,
        checked=not found.unchecked,
    )
