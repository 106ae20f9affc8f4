"""The memory tier: the newest training state as a sealed HF checkpoint folder in RAM.

What must hold: a kill at any point of a snapshot's write leaves the previous
step's snapshot sealed and the torn one invalid (exactly what the daemon's
validation calls); resuming the sealed one starts at its step and ends
bit-identical to an uninterrupted run; a write never goes into the slot that
holds the newest sealed snapshot (or the one resumed from); a snapshot due
while a write runs is skipped, never waited for; a failing write turns the
tier off and training finishes.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.contract import (
    MEMORY_RECORD,
    MEMORY_SLOTS,
    PROGRESS_MEMORY_SNAPSHOT,
)
from ftsup.supervisor.manifest import MANIFEST_NAME, build_manifest, read_manifest, write_manifest
from ftsup.trainer.async_save import PartRunner
from ftsup.trainer.checkpointing import is_complete, list_checkpoints
from ftsup.trainer.config import ConfigError, load_run_config
from ftsup.trainer.memory_tier import MemoryTier, newest_slot
from tests.trainer.trainer_helpers import TrainerProcess, step_losses, write_config

MAX_STEPS = 10  # 5 optimizer steps per epoch: the kills below cross the boundary
LINEAGE = "lineage-test"


# ------------------------------------------------------------------ in process


def sealed_folder(folder: Path, step: int) -> Path:
    """A sealed checkpoint folder with one file (what a slot holds after a write)."""
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * step)
    manifest = build_manifest(folder, step=step, world_size=1, fingerprint={}, created_at=0.0)
    write_manifest(folder, manifest)
    return folder


def one_file(folder: Path, part: PartRunner) -> None:
    part("after_weights", lambda: (folder / "adapter_model.safetensors").write_bytes(b"new"))


def sealed_steps(memory: Path) -> dict[str, list[int]]:
    return {
        slot: [step for step, path in list_checkpoints(memory / slot) if is_complete(path)]
        for slot in MEMORY_SLOTS
    }


def test_writes_go_to_the_slot_not_resumed_from_then_alternate(tmp_path: Path) -> None:
    memory = tmp_path / "mem"
    resumed = sealed_folder(memory / "slot-0" / "checkpoint-5", 5)
    sealed_folder(memory / "slot-1" / "checkpoint-9", 9)  # higher, but not the one resumed
    reports: list[dict[str, Any]] = []
    tier = MemoryTier(
        memory,
        1,
        job="j",
        fingerprint={"seed": 1},
        resumed_from=resumed,
        report=lambda event, **fields: reports.append({"event": event, **fields}),
        max_overhead=0,
    )
    assert tier.submit(6, one_file)
    assert tier.wait_idle(30)
    # The folder resumed from survives; the other slot was unsealed and rewritten.
    assert sealed_steps(memory) == {"slot-0": [5], "slot-1": [6]}
    assert (resumed / "adapter_model.safetensors").read_bytes() == b"w" * 5
    snapshot = memory / "slot-1" / "checkpoint-6"
    record = json.loads((snapshot / MEMORY_RECORD).read_text())
    assert {k: record[k] for k in ("job", "step")} == {"job": "j", "step": 6}
    manifest = read_manifest(snapshot)
    assert MEMORY_RECORD in {entry.path for entry in manifest.files}  # sealed with the rest
    assert manifest.fingerprint == {"seed": 1}

    assert tier.submit(7, one_file)
    assert tier.wait_idle(30)
    assert sealed_steps(memory) == {"slot-0": [7], "slot-1": [6]}
    tier.close(30)
    assert [(r["step"], r["slot"]) for r in reports] == [(6, "slot-1"), (7, "slot-0")]
    assert all(r["event"] == PROGRESS_MEMORY_SNAPSHOT and r["bytes"] > 0 for r in reports)


def test_without_a_resume_the_newest_sealed_slot_is_kept(tmp_path: Path) -> None:
    memory = tmp_path / "mem"
    sealed_folder(memory / "slot-0" / "checkpoint-5", 5)
    sealed_folder(memory / "slot-1" / "checkpoint-9", 9)
    (memory / "slot-1" / "checkpoint-10").mkdir()  # torn: never counts as newest
    assert newest_slot(memory) == 1
    assert newest_slot(tmp_path / "nothing") is None


def test_a_snapshot_due_while_writing_is_skipped_not_waited_for(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(folder: Path, part: PartRunner) -> None:
        release.wait(30)
        one_file(folder, part)

    reports: list[dict[str, Any]] = []
    tier = MemoryTier(
        tmp_path / "mem",
        1,
        job="j",
        fingerprint={},
        report=lambda event, **fields: reports.append(fields),
        max_overhead=0,
    )
    assert tier.submit(1, slow)
    assert not tier.submit(2, one_file)  # returns at once: the write of 1 still runs
    assert tier.skipped == 1
    release.set()
    tier.close(30)
    assert [(r["step"], r["skipped"]) for r in reports] == [(1, 1)]
    assert sealed_steps(tmp_path / "mem") == {"slot-0": [1], "slot-1": []}


def test_snapshots_are_spaced_to_keep_within_the_overhead_budget(tmp_path: Path) -> None:
    reports: list[dict[str, Any]] = []
    # Any write costs more than a billionth of the time until the next one is due.
    tier = MemoryTier(
        tmp_path / "mem",
        1,
        job="j",
        fingerprint={},
        report=lambda event, **fields: reports.append(fields),
        max_overhead=1e-9,
    )
    assert tier.submit(1, one_file)
    assert tier.wait_idle(30)
    assert not tier.submit(2, one_file)  # idle, but within the first write's budget
    assert (tier.paced, tier.skipped) == (1, 0)
    tier.close(30)
    assert [(r["step"], r["paced"]) for r in reports] == [(1, 0)]


def test_a_failed_write_is_reported_once_and_turns_the_tier_off(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    in_the_way = tmp_path / "mem"
    in_the_way.write_text("not a folder")
    reports: list[dict[str, Any]] = []
    tier = MemoryTier(
        in_the_way, 1, job="j", fingerprint={}, report=lambda e, **f: reports.append(f)
    )
    assert tier.submit(1, one_file)
    assert tier.wait_idle(30)
    assert not tier.enabled and not tier.submit(2, one_file)
    tier.close(30)
    assert [r["step"] for r in reports] == [1] and "error" in reports[0]
    assert capfd.readouterr().err.count("memory tier off") == 1


def test_memory_block_in_train_json(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run", {"model": "m", "dataset": ["d.jsonl"]})
    raw = json.loads(config.read_text())
    raw["memory"] = {"dir": str(tmp_path / "mem"), "every": 2}
    config.write_text(json.dumps(raw))
    memory = load_run_config(config, check_files=False).memory
    assert memory is not None and (memory.dir, memory.every) == (tmp_path / "mem", 2)
    assert memory.max_overhead is None  # the trainer's default
    raw["memory"]["max_overhead"] = 0
    config.write_text(json.dumps(raw))
    memory = load_run_config(config, check_files=False).memory
    assert memory is not None and memory.max_overhead == 0.0
    raw["memory"] = {"dir": str(tmp_path / "mem"), "every": 0}
    config.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="memory"):
        load_run_config(config, check_files=False)


# -------------------------------------------------------------- real processes


def train_table(model: Path, data: Path) -> dict[str, Any]:
    return {
        "model": str(model),
        "dataset": [str(data)],
        "cutoff_len": 64,
        "lora_rank": 4,
        "lora_dropout": 0.1,  # the RNG state matters
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 5e-3,
        "warmup_steps": 2,
        "max_steps": MAX_STEPS,
        "save_steps": 3,
        "save_total_limit": 2,
        "val_size": 4.0,
        "eval_steps": 5,
        "seed": 7,
    }


def memory_config(run_dir: Path, model: Path, data: Path, memory: Path) -> Path:
    """train.json with the memory block the daemon writes."""
    config = write_config(run_dir, train_table(model, data))
    raw = json.loads(config.read_text())
    # No spacing by cost (the default, said here): every step of these short runs
    # gets its snapshot unless the previous write still runs.
    raw["memory"] = {"dir": str(memory), "every": 1, "max_overhead": 0}
    config.write_text(json.dumps(raw, indent=1))
    return config


def memory_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == PROGRESS_MEMORY_SNAPSHOT]


@pytest.fixture(scope="module")
def failing_tier_run(
    tiny_model: Path, arith_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """An uninterrupted run whose memory folder is a file: its first write fails."""
    run_dir = tmp_path_factory.mktemp("failing") / "run"
    in_the_way = run_dir.parent / "mem"
    in_the_way.write_text("a file where the memory folder should be")
    process = TrainerProcess(memory_config(run_dir, tiny_model, arith_data, in_the_way))
    try:
        code = process.wait()
    finally:
        process.kill_group()
    final = run_dir / "out" / f"checkpoint-{MAX_STEPS}"
    return {
        "code": code,
        "log": process.log(),
        "events": process.events(),
        "adapter": (final / "adapter_model.safetensors").read_bytes(),
    }


@pytest.mark.slow
def test_a_failing_memory_folder_never_ends_training(failing_tier_run: dict[str, Any]) -> None:
    assert failing_tier_run["code"] == 0, failing_tier_run["log"]
    assert failing_tier_run["log"].count("memory tier off") == 1
    reported = memory_events(failing_tier_run["events"])
    assert len(reported) == 1 and reported[0]["step"] == 1 and reported[0]["error"]
    steps = {step for step, _ in step_losses(failing_tier_run["events"])}
    assert steps == set(range(1, MAX_STEPS + 1))


def sealed_snapshots(memory: Path) -> list[tuple[int, str, Path]]:
    """(step, slot, folder) of every snapshot the daemon's validation would resume."""
    return sorted(
        (step, slot, path)
        for slot in MEMORY_SLOTS
        for step, path in list_checkpoints(memory / slot)
        if validate_checkpoint(path, deep=True, require_manifest=True).resumable
    )


def step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("checkpoint-"))


@pytest.mark.slow
def test_kills_inside_snapshot_writes_resume_the_newest_sealed_exactly(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    failing_tier_run: dict[str, Any],
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    """Reference: `failing_tier_run`, uninterrupted (its tier went off at step 1).

    Each attempt is SIGKILLed inside the write of the first snapshot taken from
    its fault step on (a snapshot due during a write is skipped, so which steps
    have one depends on timing; the assertions do not)."""
    memory = tmp_path / "mem"
    config = memory_config(tmp_path / "run", tiny_model, arith_data, memory)
    points = (
        "memory_after_weights",
        "memory_after_optimizer",
        "memory_after_trainer_state",
        "memory_before_seal",
    )
    resume: Path | None = None
    for attempt, point in enumerate(points, start=1):
        fault_step = (step_of(resume) if resume else 0) + 2  # after 5: crosses an epoch
        process = start_trainer(
            config,
            resume_from=resume,
            env={
                "FTSUP_MEMORY_LINEAGE": LINEAGE,
                "FTSUP_ATTEMPT": str(attempt),
                "FTSUP_FAULT_AT_STEP": str(fault_step),
                "FTSUP_FAULT_POINT": point,
            },
        )
        assert process.wait() == -signal.SIGKILL, process.log()
        events = process.own_events()
        if resume is not None:
            assert_started_at(events, resume)
        sealed_now = [e for e in memory_events(events) if "slot" in e]
        # The newest sealed snapshot is the last one this attempt reported (or the one
        # it resumed from), and it is valid; the other slot holds the torn write.
        found = sealed_snapshots(memory)
        newest_step, slot, newest = found[-1]
        if sealed_now:
            assert newest_step == sealed_now[-1]["step"], (point, found, sealed_now)
        else:  # killed inside the first write after the resume
            assert newest == resume, (point, found)
        record = json.loads((newest / MEMORY_RECORD).read_text())
        assert (record["job"], record["lineage"], record["step"]) == ("run", LINEAGE, newest_step)
        other = next(s for s in MEMORY_SLOTS if s != slot)
        torn = list_checkpoints(memory / other)
        assert len(torn) == 1 and torn[0][0] > newest_step >= 1, (point, torn)
        assert torn[0][0] >= fault_step
        assert not (torn[0][1] / MANIFEST_NAME).exists()
        assert not validate_checkpoint(torn[0][1], require_manifest=True).resumable
        if resume is not None:
            # Nothing was written into the slot resumed from before a newer snapshot
            # was sealed in the other one.
            resumed_slot = resume.parent.name
            first_write = sealed_now[0]["slot"] if sealed_now else other
            assert first_write != resumed_slot
        resume = newest

    assert resume is not None
    last = start_trainer(
        config, resume_from=resume, env={"FTSUP_MEMORY_LINEAGE": LINEAGE, "FTSUP_ATTEMPT": "9"}
    )
    assert last.wait() == 0, last.log()
    events = last.own_events()
    assert_started_at(events, resume)
    final = config.parent / "out" / f"checkpoint-{MAX_STEPS}"
    assert (final / "adapter_model.safetensors").read_bytes() == failing_tier_run["adapter"]
    expected_losses = dict(step_losses(failing_tier_run["events"]))
    resumed_steps = step_losses(events)
    assert [s for s, _ in resumed_steps] == list(range(step_of(resume) + 1, MAX_STEPS + 1))
    for step, loss in resumed_steps:
        assert loss == expected_losses[step], f"step {step}: {loss} != {expected_losses[step]}"
    snapshots = memory_events(events)
    assert snapshots and all(e["bytes"] > 0 and e["stall_s"] >= 0 for e in snapshots)
    assert all(step_of(resume) < e["step"] < MAX_STEPS for e in snapshots)


def assert_started_at(events: list[dict[str, Any]], resume: Path) -> None:
    """The process resumed the snapshot's step: train_start names it, the next step follows."""
    step = step_of(resume)
    start = next(e for e in events if e["event"] == "train_start")
    assert (start["step"], start["resumed_from"]) == (step, str(resume))
    first = next(e for e in events if e["event"] == "step")
    assert first["step"] == step + 1
