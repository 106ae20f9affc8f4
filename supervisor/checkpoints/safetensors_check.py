"""Structural check of a `.safetensors` file without the safetensors library.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor
data. Every tensor's `data_offsets` must tile the data region exactly, so the
last end equals `file size - 8 - N`: a truncated or padded file is caught from
the header and the file size alone. `deep` also reads every byte (I/O errors);
safetensors has no checksums, so a flipped payload bit is only visible to an
ftsup manifest hash.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from ..userfiles import open_binary

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_READ_CHUNK = 8 * 1024 * 1024

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def check_safetensors(path: Path, *, deep: bool = False) -> str | None:
    """None when the file is intact, else the problem (to follow the file name)."""
    with open_binary(path, follow=True) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return "is empty (0 bytes)"
        if size < 8:
            return f"truncated: {size} bytes, shorter than the 8-byte header length"
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > MAX_HEADER_BYTES:
            return f"corrupt: header length {header_len} is implausible"
        if 8 + header_len > size:
            return f"truncated: header of {header_len} bytes, file has {size - 8} after the length"
        raw = handle.read(header_len)
    problem, data_end = _check_header(raw)
    if problem:
        return problem
    data_len = size - 8 - header_len
    if data_end > data_len:
        return f"truncated: the header says {data_end} data bytes, the file has {data_len}"
    if data_end < data_len:
        return f"corrupt: {data_len - data_end} bytes after the last tensor"
    if deep:
        return _read_all(path, 8 + header_len)
    return None


def _check_header(raw: bytes) -> tuple[str | None, int]:
    """(problem, end of the data region the header describes)."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return f"corrupt: header is not valid JSON ({exc})", 0
    if not isinstance(header, dict):
        return "corrupt: header is not a JSON object", 0
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _check_entry(name, entry)
        if problem:
            return problem, 0
        begin, end = entry["data_offsets"]
        ranges.append((begin, end, name))
    ranges.sort()
    expected = 0
    for begin, end, name in ranges:
        if begin != expected:
            return f"corrupt: tensor {name!r} starts at {begin}, expected {expected}", 0
        expected = end
    return None, expected


def _check_entry(name: str, entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"corrupt: tensor {name!r} has no description"
    offsets, shape, dtype = entry.get("data_offsets"), entry.get("shape"), entry.get("dtype")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        return f"corrupt: tensor {name!r} has bad data_offsets {offsets!r}"
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"corrupt: tensor {name!r} has bad shape {shape!r}"
    if not isinstance(dtype, str):
        return f"corrupt: tensor {name!r} has bad dtype {dtype!r}"
    width = DTYPE_BYTES.get(dtype)
    if width is not None and offsets[1] - offsets[0] != math.prod(shape) * width:
        return (
            f"corrupt: tensor {name!r} ({dtype} {shape}) should take "
            f"{math.prod(shape) * width} bytes, the header gives {offsets[1] - offsets[0]}"
        )
    return None


def _read_all(path: Path, start: int) -> str | None:
    """Read every data byte (an I/O error propagates: "could not check")."""
    with open_binary(path, follow=True) as handle:
        handle.seek(start)
        while handle.read(_READ_CHUNK):
            pass
    return None
