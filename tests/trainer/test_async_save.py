"""Asynchronous checkpoints: snapshot in the foreground, files and manifest in the background.

What must hold: a kill at any moment of the background write never yields a
resume from that checkpoint (no manifest yet), even the first one (the daemon
requires the manifest of a `[train]` job whatever the folder holds; the check
calls exactly what the daemon calls), the resumed run stays
bit-identical to an uninterrupted one, a save due while another is in
flight waits for it (both complete), and `async_save = false` still works.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.daemon.manager import select_resume
from ftsup.supervisor.manifest import MANIFEST_NAME
from ftsup.supervisor.spec import parse_spec
from ftsup.supervisor.spec_types import JobSpec
from ftsup.trainer.async_save import HostBuffers, model_snapshot
from ftsup.trainer.checkpointing import (
    Checkpointer,
    is_complete,
    list_checkpoints,
    newest_complete_checkpoint,
)
from tests.trainer.test_exact_resume import (
    MAX_STEPS,
    assert_matches_reference,
    reference,
    train_table,
)
from tests.trainer.trainer_helpers import TrainerProcess, step_losses, write_config

__all__ = ["reference"]  # the module-scoped fixture, shared with test_exact_resume


# ------------------------------------------------------------------ in process


def test_host_buffers_are_reused_and_hold_a_copy() -> None:
    buffers = HostBuffers(pin=False)
    live = torch.arange(6.0)
    first = buffers.copy("w", live)
    live.add_(1.0)  # training goes on
    assert torch.equal(first, torch.arange(6.0))
    second = buffers.copy("w", live)
    assert second.data_ptr() == first.data_ptr(), "buffer not reused"
    nested = buffers.to_host({"state": {0: {"m": live}}, "groups": [{"lr": 0.1}]}, "opt")
    live.zero_()
    assert torch.equal(nested["state"][0]["m"], torch.arange(6.0) + 1)
    assert nested["groups"] == [{"lr": 0.1}]


def test_model_snapshot_copies_trainable_and_references_frozen() -> None:
    first, second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    first.weight.requires_grad_(False)
    second.bias = first.bias  # tied, trainable
    model = torch.nn.Sequential(first, second)
    snap = model_snapshot(model, HostBuffers(pin=False))
    assert snap["0.weight"].data_ptr() == first.weight.data_ptr()  # frozen: no copy
    assert snap["0.bias"].data_ptr() != first.bias.data_ptr()
    assert snap["1.bias"].data_ptr() == snap["0.bias"].data_ptr()  # still tied
    with torch.no_grad():
        first.bias.add_(1.0)
    assert not torch.equal(snap["0.bias"], first.bias)


def test_failed_background_write_is_never_sealed(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-5"
    checkpointer = Checkpointer(tmp_path, fingerprint={}, async_save=True)

    def broken_write() -> None:
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    checkpointer.submit(ckpt, 5, broken_write)
    checkpointer.finalize(ckpt, 5, time.monotonic(), stall_s=0.0)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpointer.wait()
    assert not (ckpt / MANIFEST_NAME).exists()


def test_write_then_seal_in_order_and_wait_idle_blocks(tmp_path: Path) -> None:
    saved: list[tuple[int, float, float]] = []
    checkpointer = Checkpointer(
        tmp_path,
        fingerprint={},
        async_save=True,
        on_saved=lambda path, step, seconds, stall: saved.append((step, seconds, stall)),
    )
    release = threading.Event()
    ckpt = tmp_path / "checkpoint-1"

    def slow_write() -> None:
        release.wait(10)
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(b"x" * 10)

    started = time.monotonic()
    checkpointer.submit(ckpt, 1, slow_write)
    checkpointer.finalize(ckpt, 1, started, stall_s=0.01)
    threading.Timer(0.3, release.set).start()
    checkpointer.wait_idle()  # the next save would wait here
    assert time.monotonic() - started >= 0.25
    assert is_complete(ckpt)
    assert saved and saved[0][0] == 1 and saved[0][2] == 0.01 and saved[0][1] >= 0.25
    checkpointer.wait()


# -------------------------------------------------------------- real processes


def daemon_spec(out: Path) -> JobSpec:
    """The `[train]` job the daemon would run on `out` (only its kind and folder matter)."""
    text = (
        f'[job]\nname = "async"\noutput_dir = "{out}"\n\n'
        '[train]\nmodel = "tiny"\ndataset = ["data.jsonl"]\n'
    )
    return parse_spec(text, out.parent / "job.toml")


def assert_resume_point(out: Path, expected: str | None) -> Path | None:
    """The trainer's and the daemon's choice agree, and it is a complete checkpoint."""
    ours = newest_complete_checkpoint(out)
    theirs = select_resume(daemon_spec(out))  # what the daemon's runner calls
    if expected is None:
        assert ours is None and theirs.path is None, (ours, theirs)
        return None
    assert ours is not None and ours.name == expected, ours
    assert theirs.path == ours
    assert validate_checkpoint(ours, deep=True, require_manifest=True).resumable
    return ours


def train_starts(config: Path) -> int:
    """Attempts so far (all attempts append to the same progress file)."""
    progress = config.parent / "progress.jsonl"
    text = progress.read_text() if progress.exists() else ""
    return text.count('"event": "train_start"')


@pytest.mark.slow
def test_kills_during_background_writes_never_resume_a_partial_checkpoint(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    reference: dict[str, Any],
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    config = write_config(tmp_path / "run", train_table(tiny_model, arith_data))
    out = config.parent / "out"
    # (step, fault point inside the background write, resume point afterwards)
    plan: list[tuple[int, str, str | None]] = [
        (3, "after_trainer_state", None),  # the FIRST save: an HF-complete folder, unsealed
        (6, "after_weights", "checkpoint-3"),
        (9, "after_optimizer", "checkpoint-6"),
        (12, "after_scheduler", "checkpoint-9"),
        (15, "before_manifest", "checkpoint-12"),
    ]
    resume: Path | None = None
    for step, point, expected in plan:
        process = start_trainer(
            config,
            resume_from=resume,
            env={"FTSUP_FAULT_AT_STEP": str(step), "FTSUP_FAULT_POINT": point},
        )
        assert process.wait() == -signal.SIGKILL, process.log()
        partial = out / f"checkpoint-{step}"
        assert partial.is_dir() and not (partial / MANIFEST_NAME).exists(), point
        assert any(partial.iterdir()), "the write had started"
        resume = assert_resume_point(out, expected)

    # SIGKILL from outside, inside a slowed-down write of checkpoint 15 (the fault
    # points above cover every boundary between its files; this is the real signal).
    for marker in ("adapter_model.safetensors",):
        starts = train_starts(config)
        process = start_trainer(config, resume_from=resume, env={"FTSUP_FAULT_WRITE_DELAY": "0.3"})
        # Past train_start, the previous attempt's partial folder has been set aside.
        process.wait_until(lambda n=starts: train_starts(config) > n)  # type: ignore[misc]
        process.wait_until(lambda m=marker: (out / "checkpoint-15" / m).exists())  # type: ignore[misc]
        process.kill_group()
        assert not (out / "checkpoint-15" / MANIFEST_NAME).exists()
        resume = assert_resume_point(out, "checkpoint-12")

    last = start_trainer(config, resume_from=resume)
    assert last.wait() == 0, last.log()
    final = out / f"checkpoint-{MAX_STEPS}"
    assert (final / "adapter_model.safetensors").read_bytes() == reference["adapter"]
    assert_matches_reference(last.events(), reference)
    assert {step for step, _ in step_losses(last.events())} == set(range(1, MAX_STEPS + 1))
    # Every abandoned partial folder was set aside (by the daemon's selection or
    # the trainer's own start), none was sealed.
    assert len(list(out.glob("checkpoint-15.invalid-*"))) == 2
    assert len(list(out.glob("checkpoint-3.invalid-*"))) == 1


@pytest.mark.slow
def test_a_save_due_while_one_is_in_flight_waits_and_both_complete(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    reference: dict[str, Any],
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    """A checkpoint every step, each write slowed to ~0.3 s: every save waits for the last."""
    table = {**train_table(tiny_model, arith_data), "save_steps": 1}
    config = write_config(tmp_path / "run", table)
    process = start_trainer(config, env={"FTSUP_FAULT_WRITE_DELAY": "0.05"})
    assert process.wait() == 0, process.log()
    events = process.events()
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    assert [e["step"] for e in saved] == list(range(1, MAX_STEPS + 1))
    starts = [e["step"] for e in events if e["event"] == "checkpoint_start"]
    assert starts == list(range(1, MAX_STEPS + 1))
    for event in saved:
        assert 0 <= event["stall_s"] <= event["seconds"]
    # Saves after the first waited for their predecessor's write (6 files x 50 ms).
    waited = [e["stall_s"] for e in saved[1:]]
    assert sorted(waited)[len(waited) // 2] >= 0.1, waited
    out = config.parent / "out"
    kept = list_checkpoints(out)
    assert [step for step, _ in kept] == [MAX_STEPS - 1, MAX_STEPS]
    for _step, path in kept:
        assert validate_checkpoint(path, deep=True, require_manifest=True).resumable
    final = out / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors"
    assert final.read_bytes() == reference["adapter"]
    assert_matches_reference(events, reference)


@pytest.mark.slow
def test_synchronous_save_still_works(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    reference: dict[str, Any],
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    config = write_config(tmp_path / "run", train_table(tiny_model, arith_data), async_save=False)
    out = config.parent / "out"
    crashed = start_trainer(
        config, env={"FTSUP_FAULT_AT_STEP": "9", "FTSUP_FAULT_POINT": "before_manifest"}
    )
    assert crashed.wait() == -signal.SIGKILL, crashed.log()
    partial = out / "checkpoint-9"
    # HF wrote every file on the training thread; only the seal is missing.
    assert (partial / "trainer_state.json").exists() and (partial / "optimizer.pt").exists()
    assert not (partial / MANIFEST_NAME).exists()
    saved = [e for e in crashed.events() if e["event"] == "checkpoint_saved"]
    assert saved and all(e["stall_s"] == e["seconds"] for e in saved)
    resume = assert_resume_point(out, "checkpoint-6")
    assert resume is not None
    resumed = start_trainer(config, resume_from=resume)
    assert resumed.wait() == 0, resumed.log()
    final = out / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors"
    assert final.read_bytes() == reference["adapter"]
    assert_matches_reference(resumed.events(), reference)
