"""`ftsup-manifest.json`: the marker that makes a checkpoint complete.

The built-in trainer writes every other file first, fsyncs them, then writes
this manifest through a temporary name, fsync and rename. A checkpoint folder
without a manifest that parses is therefore incomplete by definition. Shared by
the trainer (writer) and the supervisor (validator); stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "ftsup-manifest.json"
MANIFEST_VERSION = 1
_HASH_CHUNK = 4 * 1024 * 1024


class ManifestError(ValueError):
    """The manifest is missing, unreadable or malformed; the message says which."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint folder, "/"-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    files: tuple[FileEntry, ...]
    fingerprint: Mapping[str, Any]
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "created_at": self.created_at,
            "fingerprint": dict(self.fingerprint),
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def iter_checkpoint_files(ckpt_dir: Path) -> Iterator[Path]:
    """Every regular file under the folder except the manifest and temporaries."""
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


def build_manifest(
    ckpt_dir: Path,
    *,
    step: int,
    world_size: int,
    fingerprint: Mapping[str, Any],
    created_at: float,
) -> Manifest:
    """Hash every file in the folder (after fsyncing it, so the manifest never
    describes bytes that are only in the page cache)."""
    entries = []
    for file in iter_checkpoint_files(ckpt_dir):
        fsync_path(file)
        rel = file.relative_to(ckpt_dir).as_posix()
        entries.append(FileEntry(rel, file.stat().st_size, sha256_file(file)))
    return Manifest(step, world_size, tuple(entries), dict(fingerprint), created_at)


def write_manifest(ckpt_dir: Path, manifest: Manifest) -> Path:
    """Write atomically: temporary name, fsync, rename, fsync the folder."""
    final = ckpt_dir / MANIFEST_NAME
    tmp = ckpt_dir / f"{MANIFEST_NAME}.tmp-{os.getpid()}"
    data = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_path(ckpt_dir)
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
        files = tuple(
            FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in raw["files"]
        )
        return Manifest(
            step=int(raw["step"]),
            world_size=int(raw["world_size"]),
            files=files,
            fingerprint=dict(raw.get("fingerprint", {})),
            created_at=float(raw.get("created_at", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{MANIFEST_NAME} malformed: {exc!r}") from None
