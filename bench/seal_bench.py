"""Sealing and checking a large sharded checkpoint: old sha256 seal vs the fast one.

Writes a synthetic checkpoint (`--size-gb` in `--files` shards of random
bytes, `.dat`: no format checks beyond the manifest) into a temporary folder,
fsyncs it once (untimed write-back, reported apart), then measures on the
same bytes:

1. candidates: each checksum over one in-memory buffer (GB/s, CPU s/GB);
2. seals (`build_manifest` + `write_manifest`): sha256 in one thread (what
   ftsup did before), xxh3_128 in one thread, xxh3_128 in threads (default);
3. the write path: shards written through `ChecksumWriter` (checksummed as
   they are written), then a seal that only assembles (`entries=`);
4. validation (`validate_checkpoint`): the structural check (O(files)) and
   `--deep` of the new and of an old sha256 manifest.

Everything runs with the checkpoint in the page cache (a save's bytes are,
right after the write). `--cold` adds rows for a cold cache: each file is
evicted first (posix_fadvise DONTNEED on our own files only), so the disk
bounds them. CPU is this process's user+system time, all threads.

    python bench/seal_bench.py [--size-gb 4] [--files 32] [--cold] [--repeat N]
                               [--json FILE] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import xxhash

from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.checksums import ChecksumWriter, default_threads
from ftsup.supervisor.manifest import (
    MANIFEST_NAME,
    FileEntry,
    build_manifest,
    iter_checkpoint_files,
    write_manifest,
    written_entry,
)

BLOCK = 16 * 1024 * 1024
GB = 1e9


@dataclass
class Row:
    what: str
    seconds: float
    cpu_s: float
    gb: float

    @property
    def gb_per_s(self) -> float:
        return self.gb / self.seconds if self.seconds else float("inf")

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_s / self.gb if self.gb else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "gb_per_s": self.gb_per_s, "cpu_s_per_gb": self.cpu_s_per_gb}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(what: str, gb: float, action: Callable[[], object]) -> Row:
    wall, cpu = time.perf_counter(), cpu_seconds()
    action()
    return Row(what, time.perf_counter() - wall, cpu_seconds() - cpu, gb)


def shard_sizes(total: int, files: int) -> list[int]:
    """Uneven shards (as real ones are): sizes 1..2 times the smallest."""
    weights = [1.0 + (i % 5) / 4 for i in range(files)]
    scale = total / sum(weights)
    sizes = [int(w * scale) for w in weights]
    sizes[0] += total - sum(sizes)
    return sizes


def write_shards(folder: Path, sizes: list[int], *, checksum: bool) -> list[FileEntry]:
    """Random-looking bytes (each block stamped with its file and offset);
    with `checksum`, through a ChecksumWriter: the entries a rank would hand over."""
    pattern = bytearray(os.urandom(BLOCK))
    entries = []
    for i, size in enumerate(sizes):
        path = folder / f"shard-{i:05d}-of-{len(sizes):05d}.dat"
        with path.open("wb") as handle:
            writer = ChecksumWriter(handle) if checksum else None
            done = 0
            while done < size:
                n = min(BLOCK, size - done)
                pattern[:16] = i.to_bytes(8, "little") + done.to_bytes(8, "little")
                chunk = memoryview(pattern)[:n]
                if writer is not None:
                    writer.write(chunk)
                else:
                    handle.write(chunk)
                done += n
        if writer is not None:
            entries.append(written_entry(folder, path, writer))
    return entries


def sync_all(folder: Path) -> None:
    for path in iter_checkpoint_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(folder: Path) -> None:
    """Drop our own files from the page cache (they are clean after fsync)."""
    for path in iter_checkpoint_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def seal(folder: Path, **kwargs: Any) -> None:
    manifest = build_manifest(
        folder, step=1, world_size=1, fingerprint={}, created_at=time.time(), **kwargs
    )
    write_manifest(folder, manifest)


def check(folder: Path, *, deep: bool) -> None:
    report = validate_checkpoint(folder, deep=deep)
    if not report.valid:
        raise SystemExit(f"benchmark checkpoint judged invalid: {report.reason}")


def candidates(mib: int = 256) -> list[Row]:
    buffer = memoryview(os.urandom(mib * 1024 * 1024))
    gb = len(buffer) / GB
    algos: dict[str, Callable[[memoryview], object]] = {
        "sha256": lambda b: hashlib.sha256(b).digest(),
        "blake2b": lambda b: hashlib.blake2b(b).digest(),
        "crc32 (zlib)": zlib.crc32,
        "xxh3_128": lambda b: xxhash.xxh3_128(b).digest(),
    }
    rows = []
    for name, fn in algos.items():
        reps = 4 if name.startswith(("sha", "blake")) else 16

        def repeat(fn: Callable[[memoryview], object] = fn, reps: int = reps) -> None:
            for _ in range(reps):
                fn(buffer)

        rows.append(measure(f"checksum {name}, memory", gb * reps, repeat))
    return rows


def run(size_gb: float, files: int, root: Path, cold: bool) -> dict[str, Any]:
    total = int(size_gb * GB)
    sizes = shard_sizes(total, files)
    gb = total / GB
    folder = root / "checkpoint-1"
    folder.mkdir()
    rows: list[Row] = candidates()
    # The first write into fresh page cache pays for allocating it: untimed.
    write_shards(folder, sizes, checksum=False)
    shutil.rmtree(folder)
    folder.mkdir()
    rows.append(
        measure(
            "write shards (page cache)", gb, lambda: write_shards(folder, sizes, checksum=False)
        )
    )
    rows.append(measure("fsync (write-back, untimed in seals)", gb, lambda: sync_all(folder)))
    threads = default_threads(files, at_least=4)  # what build_manifest uses
    seal(folder)  # untimed: every seal below starts from the same page cache
    rows.append(
        measure(
            "seal sha256, 1 thread (before)",
            gb,
            lambda: seal(folder, algorithm="sha256", threads=1),
        )
    )
    rows.append(measure("validate --deep, sha256 manifest", gb, lambda: check(folder, deep=True)))
    rows.append(measure("seal xxh3_128, 1 thread", gb, lambda: seal(folder, threads=1)))
    rows.append(measure(f"seal xxh3_128, {threads} threads", gb, lambda: seal(folder)))
    rows.append(measure("validate structural (no reads)", gb, lambda: check(folder, deep=False)))
    rows.append(measure("validate --deep, xxh3_128 manifest", gb, lambda: check(folder, deep=True)))
    if cold:
        evict(folder)
        rows.append(
            measure(f"seal xxh3_128, {threads} threads, cold cache", gb, lambda: seal(folder))
        )
        evict(folder)
        rows.append(
            measure("validate --deep xxh3_128, cold cache", gb, lambda: check(folder, deep=True))
        )

    shutil.rmtree(folder)
    folder.mkdir()
    entries: list[FileEntry] = []

    def write_checksummed() -> None:
        entries.extend(write_shards(folder, sizes, checksum=True))

    rows.append(measure("write shards + xxh3_128 while writing", gb, write_checksummed))
    sync_all(folder)
    rows.append(
        measure(
            "seal from the writers' entries (assemble)", gb, lambda: seal(folder, entries=entries)
        )
    )
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    reused = sum(
        1 for f, e in zip(manifest["files"], entries, strict=True) if f["xxh3_128"] == e.digest
    )
    rows.append(
        measure("validate --deep after the write-path seal", gb, lambda: check(folder, deep=True))
    )
    return {
        "size_gb": gb,
        "files": files,
        "threads": threads,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "xxhash": xxhash.VERSION,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "entries_reused": reused,
        "rows": [r.as_json() for r in rows],
    }


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each row's median wall time and median CPU time over the runs (a shared
    machine makes single wall times noisy; CPU per GB varies much less)."""
    rows = []
    for same in zip(*(r["rows"] for r in results), strict=True):
        seconds = statistics.median(r["seconds"] for r in same)
        cpu = statistics.median(r["cpu_s"] for r in same)
        rows.append(Row(same[0]["what"], seconds, cpu, same[0]["gb"]).as_json())
    return {**results[0], "runs": len(results), "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['size_gb']:.1f} GB in {result['files']} files, {result['cpus']} CPUs, "
        f"{result['threads']} threads; xxhash {result['xxhash']}, zlib {result['zlib']}; "
        f"median of {result['runs']} runs",
        f"{'':52} {'seconds':>8} {'GB/s':>7} {'CPU s/GB':>9}",
    ]
    for row in result["rows"]:
        what, seconds, rate, cpu = row["what"], row["seconds"], row["gb_per_s"], row["cpu_s_per_gb"]
        lines.append(f"{what:52} {seconds:8.3f} {rate:7.2f} {cpu:9.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--cold", action="store_true", help="add cold-cache rows")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp folder)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs; each row is the median")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results = []
    for _ in range(max(1, args.repeat)):
        root = Path(tempfile.mkdtemp(prefix="ftsup-seal-", dir=args.dir))
        try:
            results.append(run(args.size_gb, args.files, root, args.cold))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    result = median_of(results)
    print(table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
