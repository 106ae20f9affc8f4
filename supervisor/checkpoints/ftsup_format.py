"""Completeness rules for checkpoints that carry an ftsup manifest.

The manifest is written last, atomically, by the built-in trainer (or any
writer using `ftsup.supervisor.manifest`), so a manifest that parses and whose
files are all there at their recorded sizes proves the save finished: the
fast check costs a stat per file, never a read. `deep` re-checksums every
file (in parallel threads, with the algorithm each entry names: xxh3_128, or
sha256 in version 1 manifests): the only check that sees a flipped bit in a
tensor.
"""

from __future__ import annotations

import stat
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

from ..checksums import UnknownAlgorithm, checksum_files
from ..manifest import MANIFEST_NAME, FileEntry, Manifest, ManifestError, read_manifest
from ..userfiles import NotRegularFile, describe_mode, open_binary, read_bytes
from .findings import Findings

QUARANTINE_NOTE = "ftsup-quarantine.json"


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file()


def manifest_temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{MANIFEST_NAME}.*"))


def check_manifest(
    folder: Path, found: Findings, *, step: int | None, deep: bool = False
) -> Manifest | None:
    """Fill `found`; the manifest when it parses (its world size and fingerprint
    are what the other checks and the drift guard use)."""
    try:  # open it safely first: a FIFO here must be a finding, not a hang
        read_bytes(folder / MANIFEST_NAME, limit=1)
    except FileNotFoundError:
        pass  # read_manifest says "missing" in its own words
    except NotRegularFile as exc:
        found.problem(f"{MANIFEST_NAME} is {exc.what}, not a regular file")
        return None
    try:
        manifest = read_manifest(folder)
    except ManifestError as exc:
        cause = exc.__context__  # read_manifest hides its OSError: tell "could not read"
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            raise cause from None
        message = str(exc)
        if temporaries := manifest_temporaries(folder):
            message += f"; {temporaries[0]} shows the save was interrupted"
        found.problem(message)
        return None
    found.details["world_size"] = manifest.world_size
    found.details["fingerprint"] = dict(manifest.fingerprint)
    found.details["created_at"] = manifest.created_at
    if step is not None and manifest.step != step:
        found.problem(f"{MANIFEST_NAME} says step {manifest.step}, the folder is checkpoint-{step}")
    listed = set()
    to_verify: list[FileEntry] = []
    for entry in manifest.files:
        listed.add(entry.path)
        path = folder / entry.path
        try:
            st = path.stat()
        except FileNotFoundError:
            found.problem(f"{entry.path} listed in the manifest is missing")
            continue
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):
            found.problem(f"{entry.path} is {describe_mode(st.st_mode)}, not a regular file")
        elif size != entry.size:
            how = "truncated" if size < entry.size else "grew"
            found.problem(f"{entry.path} is {size} bytes, the manifest says {entry.size} ({how})")
        elif deep:
            to_verify.append(entry)
    if to_verify:
        _verify_checksums(folder, to_verify, found)
    extra = _unlisted(folder, listed)
    if extra:
        found.note(
            f"not in the manifest: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")
        )
    return manifest


def _verify_checksums(folder: Path, entries: list[FileEntry], found: Findings) -> None:
    """Checksum the files in parallel; problems in manifest order. A read error
    propagates (could not check is not corrupt)."""
    try:
        digests = checksum_files(
            ((folder / e.path, e.algorithm) for e in entries), opener=_open_safely
        )
    except UnknownAlgorithm as exc:  # unreachable for manifests this version parses
        found.problem(f"{MANIFEST_NAME}: {exc}")
        return
    for entry in entries:
        if digests[folder / entry.path] != entry.digest:
            found.problem(
                f"{entry.path} content differs from the manifest ({entry.algorithm} mismatch)"
            )


def _open_safely(path: Path) -> AbstractContextManager[BinaryIO]:
    return open_binary(path, follow=True)


def _unlisted(folder: Path, listed: set[str]) -> list[str]:
    skip = {MANIFEST_NAME, QUARANTINE_NOTE}
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        temporary = rel.startswith(MANIFEST_NAME + ".")
        if path.is_file() and rel not in listed and rel not in skip and not temporary:
            out.append(rel)
    return out
