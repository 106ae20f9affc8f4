"""Manifest format 2 (per-entry checksum algorithm), version 1 (sha256) still
verifies, and a seal that reuses the writer's checksums instead of re-reading."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.checksums import DEFAULT_ALGORITHM, ChecksumWriter, checksum_file
from ftsup.supervisor.manifest import (
    MANIFEST_NAME,
    PART_PREFIX,
    FileEntry,
    ManifestError,
    build_manifest,
    entry_for,
    read_manifest,
    write_manifest,
    write_part,
    written_entry,
)

from .builders import flip_bit, truncate

SHARDS = 6


def _shards(ckpt: Path) -> list[Path]:
    ckpt.mkdir(parents=True)
    (ckpt / "sub").mkdir()
    paths = [ckpt / f"shard-{i}.dat" for i in range(SHARDS - 1)] + [ckpt / "sub" / "state.dat"]
    for i, path in enumerate(paths):
        path.write_bytes(os.urandom(50_000 + 7_919 * i))
    return paths


def _seal(
    ckpt: Path, *, entries: list[FileEntry] | None = None, threads: int | None = None
) -> None:
    manifest = build_manifest(
        ckpt,
        step=8,
        world_size=2,
        fingerprint={"k": 1},
        created_at=time.time(),
        entries=entries or (),
        threads=threads,
    )
    write_manifest(ckpt, manifest)


def _raw(ckpt: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((ckpt / MANIFEST_NAME).read_text())
    return data


def _write_v1(ckpt: Path) -> None:
    """A manifest exactly as ftsup wrote it before format 2 (sha256 only)."""
    files = []
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        data = path.read_bytes()
        rel = path.relative_to(ckpt).as_posix()
        files.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    raw = {"version": 1, "step": 8, "world_size": 1, "created_at": 1.0, "fingerprint": {}}
    (ckpt / MANIFEST_NAME).write_text(json.dumps({**raw, "files": files}))


def test_new_manifest_names_its_algorithm_and_verifies(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-8"
    paths = _shards(ckpt)
    _seal(ckpt, threads=3)
    raw = _raw(ckpt)
    assert raw["version"] == 2
    rows = raw["files"]
    assert isinstance(rows, list)
    assert [r["path"] for r in rows] == sorted(p.relative_to(ckpt).as_posix() for p in paths)
    for row in rows:
        assert set(row) == {"path", "size", DEFAULT_ALGORITHM}
        assert row[DEFAULT_ALGORITHM] == checksum_file(ckpt / row["path"], DEFAULT_ALGORITHM)
    for deep in (False, True):
        report = validate_checkpoint(ckpt, deep=deep)
        assert report.format == "ftsup" and report.valid, report.reason


@pytest.mark.parametrize("layout", ["v1-sha256", "v2-xxh3"])
def test_truncation_is_structural_a_flipped_byte_only_deep(tmp_path: Path, layout: str) -> None:
    ckpt = tmp_path / "checkpoint-8"
    paths = _shards(ckpt)
    _write_v1(ckpt) if layout == "v1-sha256" else _seal(ckpt)
    algorithm = "sha256" if layout == "v1-sha256" else DEFAULT_ALGORITHM
    assert validate_checkpoint(ckpt, deep=True).valid

    flip_bit(paths[2])  # same size: only the content differs
    assert validate_checkpoint(ckpt).valid  # the fast check never reads the bytes
    deep = validate_checkpoint(ckpt, deep=True)
    assert deep.reason == f"shard-2.dat content differs from the manifest ({algorithm} mismatch)"

    size = paths[4].stat().st_size
    truncate(paths[4])
    fast = validate_checkpoint(ckpt)
    assert fast.reason == f"shard-4.dat is {size // 2} bytes, the manifest says {size} (truncated)"


def test_an_entry_without_a_known_checksum_is_malformed(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-8"
    _shards(ckpt)
    _seal(ckpt)
    raw = _raw(ckpt)
    rows = raw["files"]
    assert isinstance(rows, list)
    rows[0] = {"path": rows[0]["path"], "size": rows[0]["size"], "md5": "00"}
    (ckpt / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="malformed"):
        read_manifest(ckpt)
    assert (validate_checkpoint(ckpt).reason or "").startswith(f"{MANIFEST_NAME} malformed")


def test_seal_reuses_a_writers_entries_and_never_rereads(tmp_path: Path) -> None:
    """The seal trusts an entry whose size and mtime match: a planted wrong
    digest shows up in the manifest, proof that the file was not re-read."""
    ckpt = tmp_path / "checkpoint-8"
    paths = _shards(ckpt)
    given = entry_for(ckpt, paths[0])
    assert given.digest == checksum_file(paths[0])
    planted = FileEntry(given.path, given.size, "f" * 32, given.algorithm, given.mtime_ns)
    _seal(ckpt, entries=[planted])
    by_path = {e.path: e for e in read_manifest(ckpt).files}
    assert by_path[given.path].digest == "f" * 32
    assert by_path["shard-1.dat"].digest == checksum_file(paths[1])  # no entry: hashed here


def test_a_stale_entry_is_recomputed(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-8"
    paths = _shards(ckpt)
    stale = entry_for(ckpt, paths[0])
    paths[0].write_bytes(os.urandom(stale.size))  # rewritten, same size
    os.utime(paths[0], ns=(stale.mtime_ns or 0, (stale.mtime_ns or 0) + 1_000_000))
    planted = FileEntry(stale.path, stale.size, "f" * 32, stale.algorithm, stale.mtime_ns)
    _seal(ckpt, entries=[planted])
    by_path = {e.path: e for e in read_manifest(ckpt).files}
    assert by_path[stale.path].digest == checksum_file(paths[0])
    assert validate_checkpoint(ckpt, deep=True).valid


def test_parts_from_other_writers_are_merged_then_removed(tmp_path: Path) -> None:
    """Each rank leaves its shards' entries in a part file; rank 0's seal
    assembles them. Before the seal, a part is never taken for a manifest."""
    ckpt = tmp_path / "checkpoint-8"
    paths = _shards(ckpt)
    for rank, mine in enumerate((paths[:3], paths[3:])):
        entries = [entry_for(ckpt, p) for p in mine]
        planted = [
            FileEntry(e.path, e.size, f"{rank}" * 32, e.algorithm, e.mtime_ns) for e in entries
        ]
        write_part(ckpt, f"rank-{rank}", planted)
    before = validate_checkpoint(ckpt, require_manifest=True)
    assert not before.valid
    assert before.reason == (
        f"{MANIFEST_NAME} missing (checkpoint incomplete); "
        f"{PART_PREFIX}rank-0 shows the save was interrupted"
    )
    _seal(ckpt)
    digests = [e.digest for e in read_manifest(ckpt).files]
    assert sorted(digests) == ["0" * 32] * 3 + ["1" * 32] * 3  # all reused, none re-read
    assert not list(ckpt.glob(f"{PART_PREFIX}*"))
    assert {e.path for e in read_manifest(ckpt).files} == {
        p.relative_to(ckpt).as_posix() for p in paths
    }


def test_checksum_writer_entry_seals_without_a_reread(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-8"
    ckpt.mkdir()
    path = ckpt / "streamed.dat"
    with path.open("wb") as handle:
        writer = ChecksumWriter(handle)
        for _ in range(4):
            writer.write(os.urandom(100_000))
    entry = written_entry(ckpt, path, writer)
    assert entry.digest == checksum_file(path)
    _seal(ckpt, entries=[entry])
    assert validate_checkpoint(ckpt, deep=True).valid


def test_async_writer_hands_its_checksums_to_the_seal(tmp_path: Path) -> None:
    """The background writer checksums what it wrote (not the RNG files other
    ranks may be writing at that moment); the seal reuses those entries."""
    from ftsup.trainer.async_save import WrittenFiles

    ckpt = tmp_path / "checkpoint-8"
    paths = _shards(ckpt)
    (ckpt / "rng_state_1.pth").write_bytes(b"rng")
    written = WrittenFiles(ckpt)
    written.update()
    paths[1].write_bytes(os.urandom(1234))  # rewritten by a later part
    written.update()
    written.hand_over("rank-0")
    (part,) = ckpt.glob(f"{PART_PREFIX}*")
    rows = {r["path"]: r for r in json.loads(part.read_text())["files"]}
    assert set(rows) == {p.relative_to(ckpt).as_posix() for p in paths}
    assert rows["shard-1.dat"][DEFAULT_ALGORITHM] == checksum_file(paths[1])
    _seal(ckpt)
    sealed = {e.path: e.digest for e in read_manifest(ckpt).files}
    on_disk = [p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    assert sealed == {p.relative_to(ckpt).as_posix(): checksum_file(p) for p in on_disk}
    assert "rng_state_1.pth" in sealed  # checksummed by the seal itself
