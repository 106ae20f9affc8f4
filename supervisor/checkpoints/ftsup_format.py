"""Completeness rules for checkpoints that carry an ftsup manifest.

The manifest is written last, atomically, by the built-in trainer (or any
writer using `ftsup.supervisor.manifest`), so a manifest that parses and whose
files are all there at their recorded sizes proves the save finished. `deep`
re-hashes every file: the only check that sees a flipped bit in a tensor.
"""

from __future__ import annotations

from pathlib import Path

from ..manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest, sha256_file
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
    try:
        manifest = read_manifest(folder)
    except ManifestError as exc:
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
            size = path.stat().st_size
        except FileNotFoundError:
            found.problem(f"{entry.path} listed in the manifest is missing")
            continue
        except OSError as exc:
            found.problem(f"{entry.path} unreadable: {exc}")
            continue
        if size != entry.size:
            how = "truncated" if size < entry.size else "grew"
            found.problem(f"{entry.path} is {size} bytes, the manifest says {entry.size} ({how})")
        elif deep and sha256_file(path) != entry.sha256:
            found.problem(f"{entry.path} content differs from the manifest (sha256 mismatch)")
    extra = _unlisted(folder, listed)
    if extra:
        found.note(
            f"not in the manifest: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")
        )
    return manifest


def _unlisted(folder: Path, listed: set[str]) -> list[str]:
    skip = {MANIFEST_NAME, QUARANTINE_NOTE}
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        temporary = rel.startswith(MANIFEST_NAME + ".")
        if path.is_file() and rel not in listed and rel not in skip and not temporary:
            out.append(rel)
    return out
