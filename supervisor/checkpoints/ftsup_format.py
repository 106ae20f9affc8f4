"""Completeness rules for checkpoints that carry an ftsup manifest.

The manifest is written last, atomically, by the built-in trainer (or any
writer using `ftsup.supervisor.manifest`), so a manifest that parses and whose
files are all there at their recorded sizes proves the save finished. `deep`
re-hashes every file: the only check that sees a flipped bit in a tensor.
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from ..manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest
from ..userfiles import NotRegularFile, describe_mode, open_binary, read_bytes
from .findings import Findings

_HASH_CHUNK = 4 * 1024 * 1024

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
        elif deep and _sha256(path) != entry.sha256:
            found.problem(f"{entry.path} content differs from the manifest (sha256 mismatch)")
    extra = _unlisted(folder, listed)
    if extra:
        found.note(
            f"not in the manifest: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")
        )
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_binary(path, follow=True) as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _unlisted(folder: Path, listed: set[str]) -> list[str]:
    skip = {MANIFEST_NAME, QUARANTINE_NOTE}
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        temporary = rel.startswith(MANIFEST_NAME + ".")
        if path.is_file() and rel not in listed and rel not in skip and not temporary:
            out.append(rel)
    return out
