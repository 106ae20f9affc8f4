"""Fast checksums: each algorithm matches its reference, streaming and in threads."""

from __future__ import annotations

import hashlib
import io
import os
import zlib
from pathlib import Path
from typing import BinaryIO, cast

import pytest
import xxhash

from ftsup.supervisor.checksums import (
    ALGORITHMS,
    BLOCK,
    ChecksumWriter,
    UnknownAlgorithm,
    checksum_file,
    checksum_files,
    checksum_stream,
)

# Larger than one read block, and not a multiple of it: the tail is hashed too.
PAYLOAD = os.urandom(BLOCK * 2 + 12345)

REFERENCE = {
    "xxh3_128": lambda data: xxhash.xxh3_128(data).hexdigest(),
    "crc32": lambda data: f"{zlib.crc32(data):08x}",
    "sha256": lambda data: hashlib.sha256(data).hexdigest(),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_file_checksum_matches_the_one_shot_reference(tmp_path: Path, algorithm: str) -> None:
    path = tmp_path / "shard.bin"
    path.write_bytes(PAYLOAD)
    assert checksum_file(path, algorithm) == REFERENCE[algorithm](PAYLOAD)
    # a handle without readinto (read() only) gives the same answer
    assert checksum_stream(cast(BinaryIO, _ReadOnly(PAYLOAD)), algorithm) == REFERENCE[algorithm](
        PAYLOAD
    )


def test_empty_file_and_unknown_algorithm(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert checksum_file(path) == xxhash.xxh3_128(b"").hexdigest()
    with pytest.raises(UnknownAlgorithm):
        checksum_file(path, "md5")


def test_many_files_in_threads_match_one_by_one(tmp_path: Path) -> None:
    jobs = []
    for i in range(12):
        path = tmp_path / f"shard-{i:02d}.bin"
        path.write_bytes(PAYLOAD[: 1000 * (i + 1) * (i + 1) * 37])
        jobs.append((path, ALGORITHMS[i % len(ALGORITHMS)]))
    parallel = checksum_files(jobs, threads=4)
    assert parallel == {path: checksum_file(path, algo) for path, algo in jobs}
    assert checksum_files(jobs, threads=1) == parallel


def test_a_missing_file_raises_from_the_pool(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    with pytest.raises(FileNotFoundError):
        checksum_files([(tmp_path / "a", "crc32"), (tmp_path / "gone", "crc32")], threads=2)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_checksum_writer_hashes_what_it_writes(tmp_path: Path, algorithm: str) -> None:
    path = tmp_path / "written.bin"
    with path.open("wb") as handle:
        writer = ChecksumWriter(handle, algorithm)
        for start in range(0, len(PAYLOAD), 1_000_003):
            writer.write(PAYLOAD[start : start + 1_000_003])
        writer.flush()
    assert writer.size == len(PAYLOAD) == path.stat().st_size
    assert writer.hexdigest() == checksum_file(path, algorithm)


class _ReadOnly:
    def __init__(self, data: bytes) -> None:
        self._io = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._io.read(n)
