"""Checksums for sealing checkpoints at the speed of the write.

sha256 in one thread runs at 1-2 GB/s: 85 s of CPU for a 7B full checkpoint,
longer than many save intervals. A manifest guards against truncation and
bit rot, not against an adversary, so a fast non-cryptographic checksum is
enough: xxh3_128 runs at about 25 GB/s per core (bench/seal_bench.py). Files
are read in big blocks into one reused buffer, and hashing releases the GIL
(xxhash, zlib and hashlib all do for large inputs), so `checksum_files` scales
with threads. `crc32` (stdlib) and `sha256` remain readable and writable, so
old manifests verify with the algorithm they name.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

import xxhash

DEFAULT_ALGORITHM = "xxh3_128"
# Preference order when an entry carries several: fastest first.
ALGORITHMS = ("xxh3_128", "crc32", "sha256")
BLOCK = 8 * 1024 * 1024  # big reads: few syscalls, and the hash call releases the GIL
MAX_THREADS = 8


class Hasher(Protocol):
    """What `new_hasher` returns: hashlib's incremental interface."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Crc32:
    """zlib.crc32 behind hashlib's interface (8 hex digits, big-endian)."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


class UnknownAlgorithm(ValueError):
    """A manifest names a checksum this version cannot compute."""


def new_hasher(algorithm: str = DEFAULT_ALGORITHM) -> Hasher:
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "crc32":
        return _Crc32()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise UnknownAlgorithm(f"unknown checksum algorithm {algorithm!r} (known: {ALGORITHMS})")


def checksum_stream(
    handle: BinaryIO, algorithm: str = DEFAULT_ALGORITHM, *, size_hint: int | None = None
) -> str:
    """Checksum everything `handle` has left, reading up to BLOCK bytes at a time.

    `size_hint` (the file's size) sizes the buffer: a fresh 8 MiB buffer per
    small file would cost more than hashing it."""
    hasher = new_hasher(algorithm)
    length = BLOCK if size_hint is None else max(64 * 1024, min(BLOCK, size_hint + 1))
    buffer = bytearray(length)
    view = memoryview(buffer)
    readinto = getattr(handle, "readinto", None)
    while True:
        if readinto is not None:
            n = readinto(view)
            if not n:
                break
            hasher.update(view[:n])
        else:
            chunk = handle.read(length)
            if not chunk:
                break
            hasher.update(chunk)
    return hasher.hexdigest()


Opener = Callable[[Path], AbstractContextManager[BinaryIO]]


def _open_plain(path: Path) -> AbstractContextManager[BinaryIO]:
    return open(path, "rb", buffering=0)


def checksum_file(
    path: Path, algorithm: str = DEFAULT_ALGORITHM, *, opener: Opener = _open_plain
) -> str:
    """Checksum one file. `opener` lets a validator open it safely (no FIFOs)."""
    with opener(Path(path)) as handle:
        try:
            size: int | None = os.fstat(handle.fileno()).st_size
        except (AttributeError, OSError, ValueError):
            size = None
        return checksum_stream(handle, algorithm, size_hint=size)


def default_threads(count: int, *, at_least: int = 1) -> int:
    """One thread per core (but `at_least`), at most MAX_THREADS, never more than files.

    `at_least` is for work that waits on the disk more than on the CPU: a
    seal's per-file fdatasync costs a device flush each (1-3 ms on a VM
    disk), and concurrent ones are merged by the kernel.
    """
    return max(1, min(count, max(os.cpu_count() or 1, at_least), MAX_THREADS))


def checksum_files(
    jobs: Iterable[tuple[Path, str]],
    *,
    threads: int | None = None,
    opener: Opener = _open_plain,
) -> dict[Path, str]:
    """Checksum many files in parallel: {path: hexdigest} for each (path, algorithm).

    The biggest files start first so that one large shard does not run alone
    at the end. The first error (an OSError, an unknown algorithm) is raised.
    """
    todo = list(jobs)
    if not todo:
        return {}
    todo.sort(key=lambda job: _size_or_zero(job[0]), reverse=True)
    workers = default_threads(len(todo)) if threads is None else max(1, threads)
    if workers == 1:
        return {path: checksum_file(path, algo, opener=opener) for path, algo in todo}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ftsup-checksum") as pool:
        futures = [
            (path, pool.submit(checksum_file, path, algo, opener=opener)) for path, algo in todo
        ]
        return {path: future.result() for path, future in futures}


def _size_or_zero(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0  # reported by the checksum itself


class ChecksumWriter:
    """Wraps a binary file being written: checksums the bytes as they pass.

    For a writer that produces a shard itself (`torch.save(obj, writer)`,
    a raw stream of tensors): the data is hashed while hot, so sealing only
    assembles. `size` counts the bytes written. Seeking is not supported:
    a checksum of a stream that rewrote earlier bytes would be wrong.
    """

    def __init__(self, handle: BinaryIO, algorithm: str = DEFAULT_ALGORITHM) -> None:
        self._handle = handle
        self.algorithm = algorithm
        self._hasher = new_hasher(algorithm)
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        view = memoryview(data).cast("B")
        written = self._handle.write(view)
        count = len(view) if written is None else written
        self._hasher.update(view[:count])
        self.size += count
        return count

    def flush(self) -> None:
        self._handle.flush()

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "ChecksumWriter",
    "Hasher",
    "UnknownAlgorithm",
    "checksum_file",
    "checksum_files",
    "checksum_stream",
    "default_threads",
    "new_hasher",
]
