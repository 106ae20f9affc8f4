"""Manifest-last checkpoints, rotation after the manifest, stale folders, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from ftsup.supervisor.manifest import MANIFEST_NAME, read_manifest
from ftsup.trainer.checkpointing import (
    Checkpointer,
    is_complete,
    list_checkpoints,
    newest_complete_checkpoint,
    retire_checkpoints_after,
    rotate,
)


def fake_checkpoint(out: Path, step: int, *, complete: bool) -> Path:
    """A folder shaped like HF's, optionally finished with a manifest."""
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * step)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        Checkpointer(out, fingerprint={"seed": 1}).finalize(folder, step, time.monotonic())
    return folder


def test_manifest_lists_every_file_and_is_last(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path, 3, complete=True)
    manifest = read_manifest(folder)
    assert manifest.step == 3 and manifest.fingerprint == {"seed": 1}
    assert {f.path for f in manifest.files} == {"adapter_model.safetensors", "trainer_state.json"}
    assert is_complete(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"truncated")
    assert not is_complete(folder), "a size mismatch must make the checkpoint invalid"


def test_newest_complete_skips_checkpoints_without_manifest(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2, complete=True)
    fake_checkpoint(tmp_path, 10, complete=True)
    fake_checkpoint(tmp_path, 12, complete=False)
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert newest_complete_checkpoint(tmp_path / "missing") is None


def test_rotation_keeps_newest_complete_and_ignores_incomplete(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step, complete=True)
    fake_checkpoint(tmp_path, 5, complete=False)
    deleted = rotate(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-2"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4, 5]


def test_checkpointer_rotates_only_after_its_manifest(tmp_path: Path) -> None:
    saved: list[int] = []
    checkpointer = Checkpointer(
        tmp_path,
        fingerprint={},
        keep=2,
        async_save=True,
        on_saved=lambda path, step, seconds, stall: saved.append(step),
    )
    for step in (1, 2, 3):
        folder = fake_checkpoint(tmp_path, step, complete=False)
        checkpointer.finalize(folder, step, time.monotonic())
    checkpointer.wait()
    assert saved == [1, 2, 3]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert all((p / MANIFEST_NAME).exists() for _, p in list_checkpoints(tmp_path))


def test_retire_moves_later_checkpoints_aside(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 4, complete=True)
    fake_checkpoint(tmp_path, 8, complete=True)
    fake_checkpoint(tmp_path, 12, complete=False)
    retired = retire_checkpoints_after(tmp_path, 4)
    names = sorted(p.name.rsplit("-", 1)[0] for p in retired)
    assert names == ["checkpoint-12.invalid-incomplete", "checkpoint-8.superseded"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4]


def test_importing_the_package_does_not_import_torch() -> None:
    code = (
        "import sys, ftsup.trainer, ftsup.trainer.checkpointing, "
        "ftsup.trainer.data, ftsup.trainer.config; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'eager import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_each_deepspeed_rank_hands_its_own_shards_to_the_seal(tmp_path: Path) -> None:
    """Rank 1 checksums only its shards; rank 0's seal takes those entries as they are
    (a planted digest survives: the seal did not read rank 1's bytes again)."""
    from ftsup.supervisor.manifest import build_manifest, read_parts, write_part
    from ftsup.trainer.checkpointing import hand_over_rank_shards

    ckpt = tmp_path / "checkpoint-4"
    shards = ckpt / "global_step4"
    shards.mkdir(parents=True)
    for rank in (0, 1):
        (shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * (rank + 5))
    (shards / "mp_rank_00_model_states.pt").write_bytes(b"model")  # rank 0 alone writes it
    (ckpt / "trainer_state.json").write_text("{}")
    assert hand_over_rank_shards(ckpt, 1) == 1
    parts = read_parts(ckpt)
    assert list(parts) == ["global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    (entry,) = parts.values()
    planted = replace(entry, digest="0" * len(entry.digest))
    write_part(ckpt, "rank-1", [planted])
    manifest = build_manifest(ckpt, step=4, world_size=2, fingerprint={}, created_at=0.0)
    digests = {f.path: f for f in manifest.files}
    assert set(digests) == {
        "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "global_step4/mp_rank_00_model_states.pt",
        "trainer_state.json",
    }
    assert digests[entry.path].digest == planted.digest
