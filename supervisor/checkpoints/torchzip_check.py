"""Structural check of a `torch.save` file (`.pt`, `.pth`, `.bin`) without torch.

Since torch 1.6 these are zip archives whose central directory sits at the very
end, so a file cut short by a crash loses its end-of-central-directory record
first: finding that record and parsing the directory is a cheap, reliable
completeness test. `deep` reads every member and lets zipfile verify its CRC-32,
which catches flipped bits anywhere in the payload.
"""

from __future__ import annotations

import errno
import os
import zipfile
import zlib
from pathlib import Path

from ..userfiles import open_binary

_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SEARCH = 22 + 65535  # fixed record + the largest possible archive comment
_LOCAL_SIGNATURE = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # the legacy (pre-1.6) torch.save format is a plain pickle
_READ_CHUNK = 8 * 1024 * 1024


def check_torch_zip(path: Path, *, deep: bool = False) -> str | None:
    """None when the archive is intact (or legacy, which cannot be checked), else
    the problem (to follow the file name)."""
    with open_binary(path, follow=True) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return "is empty (0 bytes)"
        head = handle.read(4)
        if not head.startswith(_LOCAL_SIGNATURE):
            if head.startswith(_PICKLE_PROTO):
                return None  # legacy format: no structure to verify
            return f"corrupt: not a torch zip archive (starts with {head!r})"
        handle.seek(max(0, size - _EOCD_SEARCH))
        tail = handle.read()
        if tail.rfind(_EOCD_SIGNATURE) < 0:
            return "truncated: central directory missing"
        handle.seek(0)
        try:
            with zipfile.ZipFile(handle) as archive:
                members = archive.infolist()
                problem = _check_members(members, size)
                if problem is None and deep:
                    problem = _check_crcs(archive)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
            _reraise_read_failure(exc)
            return f"corrupt: central directory unreadable ({exc})"
    return problem


def _reraise_read_failure(exc: BaseException) -> None:
    """An OSError from the machine (EIO, EMFILE...) is "could not check"; only
    what the bytes cause (a seek to a bad offset: EINVAL) is corruption."""
    if isinstance(exc, OSError) and exc.errno not in (None, errno.EINVAL):
        raise exc


def _check_members(members: list[zipfile.ZipInfo], size: int) -> str | None:
    if not members:
        return "corrupt: empty zip archive"
    if not any(m.filename.endswith("data.pkl") for m in members):
        return "corrupt: zip archive without data.pkl (not written by torch.save)"
    for member in members:
        if member.header_offset + member.compress_size > size:
            return f"truncated: member {member.filename!r} extends past the end of the file"
    return None


def _check_crcs(archive: zipfile.ZipFile) -> str | None:
    for member in archive.infolist():
        try:
            with archive.open(member) as stream:
                while stream.read(_READ_CHUNK):
                    pass
        except zipfile.BadZipFile as exc:
            if "CRC" in str(exc):
                return f"corrupt: CRC mismatch in member {member.filename!r}"
            return f"corrupt: member {member.filename!r} unreadable ({exc})"
        except (OSError, EOFError, zlib.error) as exc:
            _reraise_read_failure(exc)
            return f"corrupt: member {member.filename!r} unreadable ({exc})"
    return None
