"""The memory tier: the newest training state in RAM, sealed after every step.

What must hold: a kill at any point of a snapshot's write leaves the previous
step's snapshot sealed and the torn one unusable (exactly what the daemon's
choice calls); resuming the sealed one starts at its step and ends
bit-identical to an uninterrupted run, log history included; a write never
goes into the slot that holds the newest sealed snapshot (or the one resumed
from); snapshots are spaced out to keep within an overhead budget; a failing
write turns the tier off and training finishes.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.contract import MEMORY_RECORD, MEMORY_SLOTS, PROGRESS_MEMORY_SNAPSHOT
from ftsup.supervisor.memory_tier import newest_usable, read_record
from ftsup.trainer.config import ConfigError, load_run_config
from ftsup.trainer.memory_snapshot import SlotHistory, seal
from ftsup.trainer.memory_tier import MemoryTier, newest_slot, pacing_delay, slot_folders
from ftsup.trainer.run import run_fingerprint
from tests.trainer.trainer_helpers import TrainerProcess, step_losses, write_config

MAX_STEPS = 10  # 5 optimizer steps per epoch: the kills below cross the boundary
LINEAGE = "lineage-test"


# ------------------------------------------------------------------ in process


def one_file(
    folder: Path,
    history: SlotHistory | None,
    record: Mapping[str, Any],
    point: Callable[[str], None],
) -> tuple[int, SlotHistory]:
    """A write as the tier hands it out: the data, a fault point, the seal."""
    (folder / "data").write_bytes(b"new")
    point("memory_before_seal")
    seal(folder, {**record, "files": {"data": 3}})
    return 3, SlotHistory()


def sealed_folder(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "data").write_bytes(b"w" * step)
    seal(folder, {"step": step, "files": {"data": step}})
    return folder


def sealed_steps(memory: Path) -> dict[str, list[int]]:
    return {
        slot: [step for step, path in slot_folders(memory / slot) if read_record(path)]
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
    # The folder resumed from survives; the other slot was unsealed, renamed, rewritten.
    assert sealed_steps(memory) == {"slot-0": [5], "slot-1": [6]}
    assert (resumed / "data").read_bytes() == b"w" * 5
    record = json.loads((memory / "slot-1" / "checkpoint-6" / MEMORY_RECORD).read_text())
    assert {k: record[k] for k in ("job", "step", "fingerprint")} == {
        "job": "j",
        "step": 6,
        "fingerprint": {"seed": 1},
    }
    assert tier.submit(7, one_file)
    assert sealed_steps(memory) == {"slot-0": [7], "slot-1": [6]}
    assert [(r["step"], r["slot"]) for r in reports] == [(6, "slot-1"), (7, "slot-0")]
    assert all(r["event"] == PROGRESS_MEMORY_SNAPSHOT and r["bytes"] == 3 for r in reports)


def test_a_write_killed_before_its_seal_leaves_the_slot_unsealed(tmp_path: Path) -> None:
    memory = tmp_path / "mem"
    kept = sealed_folder(memory / "slot-0" / "checkpoint-5", 5)
    sealed_folder(memory / "slot-1" / "checkpoint-4", 4)

    def killed(step: int, point: str) -> None:
        raise KeyboardInterrupt(point)  # stands for the SIGKILL: nothing after it runs

    tier = MemoryTier(memory, 1, job="j", fingerprint={}, on_point=killed, max_overhead=0)
    with pytest.raises(KeyboardInterrupt, match="memory_before_seal"):
        tier.submit(6, one_file)
    # The older slot was unsealed first and renamed; the newest sealed one is untouched.
    assert sealed_steps(memory) == {"slot-0": [5], "slot-1": []}
    assert [step for step, _ in slot_folders(memory / "slot-1")] == [6]
    assert read_record(kept) is not None


def test_without_a_resume_the_newest_sealed_slot_is_kept(tmp_path: Path) -> None:
    memory = tmp_path / "mem"
    sealed_folder(memory / "slot-0" / "checkpoint-5", 5)
    sealed_folder(memory / "slot-1" / "checkpoint-9", 9)
    (memory / "slot-1" / "checkpoint-10").mkdir()  # torn: never counts as newest
    assert newest_slot(memory) == 1
    assert newest_slot(tmp_path / "nothing") is None


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
    assert tier.submit(1, one_file)  # the attempt's first write: one-time costs, no spacing
    assert tier.submit(2, one_file)
    assert not tier.submit(3, one_file)  # within the second write's budget
    assert tier.paced == 1
    assert [(r["step"], r["paced"]) for r in reports] == [(1, 0), (2, 0)]


def test_one_slow_write_does_not_pause_the_tier() -> None:
    """Spacing follows the median of the recent writes: at 5%, one write of 0.4 s
    among writes of 1 ms would otherwise stop snapshots for 8 s."""
    assert pacing_delay([0.001, 0.4, 0.001], 0.05) == pytest.approx(0.02)
    assert pacing_delay([0.001, 0.4, 0.4], 0.05) == pytest.approx(8.0)  # slow for good
    assert pacing_delay([0.4], 0.0) == 0.0  # no budget: every due step
    assert pacing_delay([], 0.05) == 0.0


def test_a_failed_write_is_reported_once_and_turns_the_tier_off(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    in_the_way = tmp_path / "mem"
    in_the_way.write_text("not a folder")
    reports: list[dict[str, Any]] = []
    tier = MemoryTier(
        in_the_way, 1, job="j", fingerprint={}, report=lambda e, **f: reports.append(f)
    )
    assert not tier.submit(1, one_file)
    assert not tier.enabled and not tier.submit(2, one_file)
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
        # The kills below resume steps 3 and 6, inside a logging window: the first loss
        # logged after each averages the same steps as the uninterrupted run's.
        "logging_steps": 2,
    }


def memory_config(
    run_dir: Path, model: Path, data: Path, memory: Path, *, async_save: bool = True
) -> Path:
    """train.json with the memory block the daemon writes."""
    config = write_config(run_dir, train_table(model, data), async_save=async_save)
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
        "history": history_without_timings(final / "trainer_state.json"),
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
    """(step, slot, folder) of every sealed snapshot."""
    return sorted(
        (step, slot, path)
        for slot in MEMORY_SLOTS
        for step, path in slot_folders(memory / slot)
        if read_record(path) is not None
    )


def step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("checkpoint-"))


def history_without_timings(state_file: Path) -> list[dict[str, Any]]:
    """trainer_state.json's log history without the wall-clock fields."""
    history = json.loads(state_file.read_text())["log_history"]
    return [
        {k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k}
        for entry in history
    ]


@pytest.mark.slow
def test_kills_inside_snapshot_writes_resume_the_newest_sealed_exactly(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    failing_tier_run: dict[str, Any],
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    """Reference: `failing_tier_run`, uninterrupted (its tier went off at step 1).

    A snapshot every step; each attempt is SIGKILLed inside the write of its
    fault step's snapshot, so the step before is the newest sealed one."""
    memory = tmp_path / "mem"
    config = memory_config(tmp_path / "run", tiny_model, arith_data, memory)
    fingerprint = run_fingerprint(load_run_config(config, check_files=False))
    resume: Path | None = None
    for attempt, point in enumerate(("memory_after_tensors", "memory_before_seal"), start=1):
        # 4, then 7: the second attempt resumes step 3 and crosses the epoch at 5.
        fault_step = (step_of(resume) if resume else 0) + 4
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
        sealed_now = [e["step"] for e in memory_events(events) if "slot" in e]
        first = step_of(resume) + 1 if resume else 1
        assert sealed_now == list(range(first, fault_step)), (point, sealed_now)
        # The daemon's choice is the step before the kill; the other slot holds the
        # torn write of the fault step, with no record.
        chosen = newest_usable(
            memory, job="run", lineage=LINEAGE, fingerprint=fingerprint, newer_than=-1
        )
        assert chosen is not None and chosen.step == fault_step - 1, (point, chosen)
        assert chosen.attempt == attempt
        newest = chosen.path
        other = next(s for s in MEMORY_SLOTS if s != newest.parent.name)
        torn = slot_folders(memory / other)
        assert [step for step, _ in torn] == [fault_step], (point, torn)
        assert read_record(torn[0][1]) is None
        assert [step for step, _, _ in sealed_snapshots(memory)] == [fault_step - 1]
        resume = newest

    assert resume is not None
    last = start_trainer(
        config, resume_from=resume, env={"FTSUP_MEMORY_LINEAGE": LINEAGE, "FTSUP_ATTEMPT": "9"}
    )
    assert last.wait() == 0, last.log()
    events = last.own_events()
    assert_started_at(events, resume)
    assert next(e for e in events if e["event"] == "train_start")["resumed_from_memory"] is True
    final = config.parent / "out" / f"checkpoint-{MAX_STEPS}"
    assert (final / "adapter_model.safetensors").read_bytes() == failing_tier_run["adapter"]
    # The steps before the resume came back from the snapshot's history file.
    assert history_without_timings(final / "trainer_state.json") == failing_tier_run["history"]
    expected_losses = dict(step_losses(failing_tier_run["events"]))
    resumed_steps = step_losses(events)
    assert [s for s, _ in resumed_steps] == list(range(step_of(resume) + 1, MAX_STEPS + 1))
    for step, loss in resumed_steps:
        assert loss == expected_losses[step], f"step {step}: {loss} != {expected_losses[step]}"
    snapshots = memory_events(events)
    assert [e["step"] for e in snapshots] == list(range(step_of(resume) + 1, MAX_STEPS))
    assert all(e["bytes"] > 0 and e["stall_s"] >= 0 for e in snapshots)
    assert not (memory / "resume").exists()  # the folder HF loaded is gone

    # A snapshot whose state no longer loads (same size, other bytes): the trainer gives
    # it up (unsealed, exit 1) instead of failing on it at every restart.
    broken = next(path for _, _, path in reversed(sealed_snapshots(memory)))
    state = broken / "state.pkl"
    state.write_bytes(b"x" * state.stat().st_size)
    choice = dict(job="run", lineage=LINEAGE, fingerprint=fingerprint, newer_than=-1)
    chosen = newest_usable(memory, **choice)  # type: ignore[arg-type]
    assert chosen is not None and chosen.path == broken  # the sizes still match
    again = start_trainer(config, resume_from=broken, env={"FTSUP_MEMORY_LINEAGE": LINEAGE})
    assert again.wait() == 1, again.log()
    assert "cannot be resumed" in again.log() and read_record(broken) is None
    assert not step_losses(again.own_events())  # not one step trained from it
    after = newest_usable(memory, **choice)  # type: ignore[arg-type]
    assert after is None or after.path != broken


@pytest.mark.slow
def test_a_kill_during_a_disk_save_resumes_that_steps_snapshot_exactly(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    failing_tier_run: dict[str, Any],
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    """Step 6 saves to disk (a synchronous save, so the kill lands in the training
    thread): SIGKILL after its files, before its manifest. Its snapshot was taken
    before the save began, so the daemon's choice is step 6 itself, not step 5
    (a snapshot taken after the save, as until session 14, never came), and the
    resumed run ends as the uninterrupted one."""
    memory = tmp_path / "mem"
    config = memory_config(tmp_path / "run", tiny_model, arith_data, memory, async_save=False)
    fingerprint = run_fingerprint(load_run_config(config, check_files=False))
    env = {"FTSUP_MEMORY_LINEAGE": LINEAGE, "FTSUP_ATTEMPT": "1"}
    killed = start_trainer(
        config, env={**env, "FTSUP_FAULT_AT_STEP": "6", "FTSUP_FAULT_POINT": "before_manifest"}
    )
    assert killed.wait() == -signal.SIGKILL, killed.log()
    out = config.parent / "out"
    assert (out / "checkpoint-6").is_dir()  # its files, no manifest: not a valid one
    assert [step for step, _, _ in sealed_snapshots(memory)][-1] == 6
    choice = newest_usable(
        memory, job="run", lineage=LINEAGE, fingerprint=fingerprint, newer_than=3
    )
    assert choice is not None and choice.step == 6, choice

    resumed = start_trainer(config, resume_from=choice.path, env={**env, "FTSUP_ATTEMPT": "2"})
    assert resumed.wait() == 0, resumed.log()
    events = resumed.own_events()
    assert_started_at(events, choice.path)
    final = out / f"checkpoint-{MAX_STEPS}"
    assert (final / "adapter_model.safetensors").read_bytes() == failing_tier_run["adapter"]
    assert history_without_timings(final / "trainer_state.json") == failing_tier_run["history"]


def assert_started_at(events: list[dict[str, Any]], resume: Path) -> None:
    """The process resumed the snapshot's step: train_start names it, the next step follows."""
    step = step_of(resume)
    start = next(e for e in events if e["event"] == "train_start")
    assert (start["step"], start["resumed_from"]) == (step, str(resume))
    first = next(e for e in events if e["event"] == "step")
    assert first["step"] == step + 1
