"""Quarantine by renaming: `checkpoint-N` -> `checkpoint-N.invalid-<reason-slug>`.

Never deletes. The new name no longer matches `checkpoint-<N>` exactly, so
neither ftsup's resume selection nor transformers' `get_last_checkpoint` picks
it up, and a person can inspect it and `restore` it. The full reason goes into
`ftsup-quarantine.json` inside the folder (the slug is short); `restore`
removes that note and renames back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

from ftsup.supervisor.contract import CHECKPOINT_PREFIX, CHECKPOINT_RE

from ..userfiles import NotRegularFile, read_bytes
from .ftsup_format import QUARANTINE_NOTE
from .report import QUARANTINED_RE, checkpoint_step

SLUG_MAX = 48


def reason_slug(reason: str) -> str:
    """`"optimizer.pt truncated: central directory missing"` ->
    `"optimizer-pt-truncated-central-directory-missing"` (lowercase, at most 48)."""
    slug = re.sub(r"[^a-z0-9]+", "-", reason.lower()).strip("-")
    if len(slug) > SLUG_MAX:
        slug = slug[:SLUG_MAX].rsplit("-", 1)[0] if "-" in slug[:SLUG_MAX] else slug[:SLUG_MAX]
    return slug or "invalid"


def quarantine(path: Path, reason: str) -> Path:
    """Rename `path` (a `checkpoint-N` folder) out of the way; the new path.

    Raises ValueError when the name is not `checkpoint-N`, FileNotFoundError
    when it does not exist. A name already taken gets `-2`, `-3`, ... appended.
    """
    path = Path(path)
    match = CHECKPOINT_RE.match(path.name)
    if not match:
        raise ValueError(f"{path.name} is not a checkpoint-<N> folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    base = f"{path.name}.invalid-{reason_slug(reason)}"
    target = path.with_name(base)
    counter = 2
    while target.exists():
        target = path.with_name(f"{base}-{counter}")
        counter += 1
    os.rename(path, target)
    _write_note(target, path.name, reason)
    return target


def restore(path: Path) -> Path:
    """Rename a quarantined folder back to `checkpoint-N`; the new path.

    Raises ValueError when the name is not a quarantined one, FileExistsError
    when `checkpoint-N` exists again (a newer save of the same step).
    """
    path = Path(path)
    match = QUARANTINED_RE.match(path.name)
    if not match:
        raise ValueError(f"{path.name} is not a quarantined checkpoint-<N>.invalid-* folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    target = path.with_name(CHECKPOINT_PREFIX + match.group(1))
    if target.exists():  # os.rename would silently replace an empty folder
        raise FileExistsError(f"{target} exists; move it away first")
    os.rename(path, target)
    (target / QUARANTINE_NOTE).unlink(missing_ok=True)
    return target


def quarantine_reason(path: Path) -> str | None:
    """The full reason recorded when `path` was quarantined (None if no note)."""
    try:
        data = json.loads(read_bytes(Path(path) / QUARANTINE_NOTE, limit=1 << 20))
    except (OSError, ValueError, NotRegularFile, RecursionError):
        return None
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) else None


def list_quarantined(output_dir: Path) -> list[Path]:
    """Quarantined folders, by step number."""
    try:
        entries = [p for p in Path(output_dir).iterdir() if QUARANTINED_RE.match(p.name)]
    except FileNotFoundError:
        return []
    return sorted(entries, key=lambda p: (checkpoint_step(p) or 0, p.name))


def _write_note(folder: Path, original: str, reason: str) -> None:
    """Best effort: the rename is what matters; a full disk must not undo it."""
    note = {"reason": reason, "original": original, "quarantined_at": time.time()}
    with contextlib.suppress(OSError):
        (folder / QUARANTINE_NOTE).write_text(json.dumps(note, indent=1) + "\n")
