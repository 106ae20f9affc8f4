"""`ftsup-manifest.json`: the marker that makes a checkpoint complete.

The built-in trainer writes every other file first, fsyncs them, then writes
this manifest through a temporary name, fsync and rename. A checkpoint folder
without a manifest that parses is therefore incomplete by definition. Shared by
the trainer (writer) and the supervisor (validator).

Each file entry carries its size and a checksum under the algorithm's name
(`"xxh3_128": "..."`; version 1 manifests have `"sha256"`, still read and
verified). Sealing need not re-read the checkpoint: a writer checksums each
file right after writing it (`entry_for`, or `ChecksumWriter` while writing),
and hands the entries over in memory (`build_manifest(entries=...)`) or, from
another thread or rank, in a part file (`write_part`); the seal then only
stats, fsyncs and assembles. Anything without an entry is checksummed at the
seal, in parallel threads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checksums import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    ChecksumWriter,
    checksum_file,
    default_threads,
)

MANIFEST_NAME = "ftsup-manifest.json"
MANIFEST_VERSION = 2  # 2: per-entry checksum algorithm; 1: sha256 only
PART_PREFIX = f"{MANIFEST_NAME}.part-"  # a writer's entries, merged at the seal


class ManifestError(ValueError):
    """The manifest is missing, unreadable or malformed; the message says which."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint folder, "/"-separated
    size: int
    digest: str
    algorithm: str = DEFAULT_ALGORITHM
    # From a writer: the file's mtime when it was checksummed. The seal reuses
    # the entry only if size and mtime are unchanged (None: size only, the
    # caller vouches for it). Never stored in a manifest.
    mtime_ns: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, self.algorithm: self.digest}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> FileEntry:
        """An entry of any manifest version: the fastest known checksum it carries."""
        for algorithm in ALGORITHMS:
            if algorithm in raw:
                mtime = raw.get("mtime_ns")
                return cls(
                    str(raw["path"]),
                    int(raw["size"]),
                    str(raw[algorithm]),
                    algorithm,
                    None if mtime is None else int(mtime),
                )
        raise KeyError(f"{raw.get('path')!r} has no checksum of {', '.join(ALGORITHMS)}")


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    files: tuple[FileEntry, ...]
    fingerprint: Mapping[str, Any]
    created_at: float
    # The ranks whose per-rank files (rng_state_<rank>.pth) this folder holds: a
    # node-local copy (`save_on_each_node`) holds its node's only. None: every
    # rank of `world_size` (a shared folder; manifests written before the field).
    ranks: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": MANIFEST_VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "created_at": self.created_at,
            "fingerprint": dict(self.fingerprint),
            "files": [f.to_json() for f in self.files],
        }
        if self.ranks is not None:
            out["ranks"] = list(self.ranks)
        return out


def sha256_file(path: Path) -> str:
    """Kept for callers of version 1; new code uses `checksums.checksum_file`."""
    return checksum_file(path, "sha256")


def iter_checkpoint_files(ckpt_dir: Path) -> Iterator[Path]:
    """Every regular file under the folder except the manifest, its parts and temporaries."""
    for root, dirs, files in os.walk(ckpt_dir):
        dirs.sort()
        for name in sorted(files):
            if name == MANIFEST_NAME or name.startswith(MANIFEST_NAME + "."):
                continue
            yield Path(root) / name


def fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_data(path: Path) -> None:
    """fdatasync: the bytes and the size are durable. Unlike fsync it does not
    force a journal commit for an atime that reading the file just updated."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def entry_for(
    ckpt_dir: Path, file: Path, *, algorithm: str = DEFAULT_ALGORITHM, fsync: bool = False
) -> FileEntry:
    """The entry of a file its writer just finished (its bytes are hot in the
    page cache): call it right after writing, pass the result to the seal."""
    if fsync:
        sync_data(file)
    before = os.stat(file)
    digest = checksum_file(file, algorithm)
    after = os.stat(file)
    rel = Path(file).relative_to(ckpt_dir).as_posix()
    # Changed while hashed: keep the older mtime, so that the seal sees a
    # mismatch and checksums the file again.
    return FileEntry(rel, after.st_size, digest, algorithm, before.st_mtime_ns)


def written_entry(ckpt_dir: Path, file: Path, writer: ChecksumWriter) -> FileEntry:
    """The entry of a file written (and closed) through a `ChecksumWriter`."""
    st = os.stat(file)
    if st.st_size != writer.size:
        raise ValueError(f"{file} is {st.st_size} bytes, {writer.size} went through the writer")
    rel = Path(file).relative_to(ckpt_dir).as_posix()
    return FileEntry(rel, st.st_size, writer.hexdigest(), writer.algorithm, st.st_mtime_ns)


def write_part(ckpt_dir: Path, name: str, entries: Iterable[FileEntry]) -> Path:
    """Hand entries to the seal from another thread or rank (`name`: e.g. "rank-1").

    Written atomically; `build_manifest` merges every part it finds and
    `write_manifest` removes them once the manifest is durable. A leftover
    part (a crash) is ignored by every check, like a manifest temporary.
    """
    final = Path(ckpt_dir) / f"{PART_PREFIX}{name}"
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    rows = [{**e.to_json(), "mtime_ns": e.mtime_ns} for e in entries]
    with tmp.open("wb") as handle:
        handle.write(json.dumps({"files": rows}).encode())
    os.replace(tmp, final)
    return final


def read_parts(ckpt_dir: Path) -> dict[str, FileEntry]:
    """Entries from every part file in the folder (a damaged part is skipped:
    its files are then checksummed at the seal)."""
    found: dict[str, FileEntry] = {}
    for part in sorted(Path(ckpt_dir).glob(f"{PART_PREFIX}*")):
        if ".tmp-" in part.name:
            continue
        try:
            for raw in json.loads(part.read_text())["files"]:
                entry = FileEntry.from_json(raw)
                found[entry.path] = entry
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def build_manifest(
    ckpt_dir: Path,
    *,
    step: int,
    world_size: int,
    fingerprint: Mapping[str, Any],
    created_at: float,
    entries: Iterable[FileEntry] = (),
    algorithm: str = DEFAULT_ALGORITHM,
    threads: int | None = None,
    ranks: Iterable[int] | None = None,
) -> Manifest:
    """List every file in the folder, synced to disk (the manifest never
    describes bytes that are only in the page cache), with its checksum.

    A writer's entry (`entries`, or a part file in the folder) is reused when
    the file's size and mtime (if it has one) still match it; every other file is
    checksummed here with `algorithm`. Syncs and checksums run in `threads`
    (default: one per core but at least 4, at most 8: the syncs wait on the
    disk, and concurrent ones are merged). `ranks`: a node-local copy's ranks
    (`Manifest.ranks`); None for a folder that holds every rank's files.
    """
    ckpt_dir = Path(ckpt_dir)
    known = read_parts(ckpt_dir)
    known.update({e.path: e for e in entries})
    files = list(iter_checkpoint_files(ckpt_dir))

    def seal(file: Path) -> FileEntry:
        sync_data(file)
        rel = file.relative_to(ckpt_dir).as_posix()
        st = os.stat(file)
        given = known.get(rel)
        if (
            given is not None
            and given.size == st.st_size
            and given.mtime_ns in (None, st.st_mtime_ns)
        ):
            return FileEntry(rel, given.size, given.digest, given.algorithm)
        return FileEntry(rel, st.st_size, checksum_file(file, algorithm), algorithm)

    workers = default_threads(len(files), at_least=4) if threads is None else max(1, threads)
    if workers == 1:
        sealed = [seal(f) for f in files]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftsup-seal") as pool:
            sealed = list(pool.map(seal, files))
    held = None if ranks is None else tuple(sorted(set(ranks)))
    return Manifest(step, world_size, tuple(sealed), dict(fingerprint), created_at, held)


def write_manifest(ckpt_dir: Path, manifest: Manifest) -> Path:
    """Write atomically: temporary name, fsync, rename, fsync the folder; then
    drop the part files the seal merged."""
    final = ckpt_dir / MANIFEST_NAME
    tmp = ckpt_dir / f"{MANIFEST_NAME}.tmp-{os.getpid()}"
    data = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_path(ckpt_dir)
    for part in Path(ckpt_dir).glob(f"{PART_PREFIX}*"):
        part.unlink(missing_ok=True)
    return final


def read_manifest(ckpt_dir: Path) -> Manifest:
    path = ckpt_dir / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{MANIFEST_NAME} missing (checkpoint incomplete)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{MANIFEST_NAME} unreadable: {exc}") from None
    try:
        files = tuple(FileEntry.from_json(f) for f in raw["files"])
        return Manifest(
            step=int(raw["step"]),
            world_size=int(raw["world_size"]),
            files=tuple(FileEntry(f.path, f.size, f.digest, f.algorithm) for f in files),
            fingerprint=dict(raw.get("fingerprint", {})),
            created_at=float(raw.get("created_at", 0.0)),
            ranks=_ranks(raw.get("ranks")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{MANIFEST_NAME} malformed: {exc!r}") from None


def _ranks(value: Any) -> tuple[int, ...] | None:
    """The optional `ranks` list: absent or null -> None; anything but a list of
    distinct ranks >= 0 is malformed (ValueError, reported as such)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in value
    ):
        raise ValueError(f"ranks must be a list of ranks >= 0, got {value!r}")
    if not value or len(set(value)) != len(value):
        raise ValueError(f"ranks must name each rank once, at least one, got {value!r}")
    return tuple(sorted(value))
