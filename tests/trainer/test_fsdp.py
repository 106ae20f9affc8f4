"""FSDP full fine-tuning in the built-in trainer (issue 16): real runs on CPU.

Two processes under ftsup's torchrun wrapper with `[launch] fsdp =
"full_shard"`, through HF Trainer's own FSDP2 integration, sharded state
dicts (torch.distributed.checkpoint). An uninterrupted run, and a run whose
rank 0 is SIGKILLed in the middle of the save of step 4 (every rank's shards
written, no manifest yet), resumed from the checkpoint the supervisor
selects: the final weights and optimizer state must be bit-identical. The
killed run repeats the reference's losses bit for bit up to its kill (two
runs from scratch), so the runs are deterministic and no tolerance is needed.
The checkpoints these runs wrote are then damaged as real failures do (a
missing or truncated rank shard, a `.metadata` missing) and must be refused.

All runs are elastic (`"elastic": {"global_batch": 4}`, 2 per device), so the
killed run's sealed checkpoint 2, written by two processes, also resumes on
one (accumulation 2): DCP reshards it on load. Its losses must match an
uninterrupted one-process run with the same global batch within a relative
1e-5 (on two processes the gradient is the mean of two reduced partial sums,
on one a single sum: float rounding, see test_elastic_jobs); a lost optimizer
state or a wrong data position moves them by far more. The final checkpoint
is exported to a standalone model equal to its DCP shards.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.checkpoints.discovery import select_resume
from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.manifest import MANIFEST_NAME, read_manifest
from ftsup.supervisor.spec import SpecError, parse_spec
from ftsup.supervisor.spec_types import LaunchSection
from ftsup.supervisor.trainer_launch import DISTRUN_MODULE, build_trainer_argv
from ftsup.trainer.tiny import build_arithmetic_dataset, build_tiny_model
from tests.trainer.trainer_helpers import (
    TRAINER_ENV,
    TrainerProcess,
    full_train_table,
    step_losses,
    write_config,
)

pytestmark = pytest.mark.slow  # trains real models: starts first (tests/conftest.py)

MAX_STEPS = 6
SAVE_STEPS = 2
GLOBAL_BATCH = 4  # 2 per device x 2 processes x accumulation 1; on one process, accumulation 2
REL_TOL = 1e-5
SHARDS = sorted(
    f"{folder}/{name}"
    for folder in ("optimizer_0", "pytorch_model_fsdp_0")
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp")
)


@dataclass
class Runs:
    reference: Path  # output folders
    resumed: Path
    killed_log: str
    killed_losses: list[tuple[int, float]]
    resumed_from: Path
    resumed_losses: list[tuple[int, float]]
    reference_losses: list[tuple[int, float]]
    resumed_start_step: int
    one_process_losses: list[tuple[int, float]]  # uninterrupted, same global batch
    resized: Path  # output folder of the one-process resume of checkpoint 2
    resized_start: dict[str, Any]
    resized_losses: list[tuple[int, float]]
    resized_log: str


def run(run_dir: Path, train: dict[str, Any], nproc: int = 2, **kwargs: Any) -> TrainerProcess:
    config = write_config(run_dir, train, async_save=True)
    payload = json.loads(config.read_text())
    payload["elastic"] = {"global_batch": GLOBAL_BATCH}
    config.write_text(json.dumps(payload, indent=1))
    launch = LaunchSection(nproc_per_node=nproc, fsdp="full_shard")
    process = TrainerProcess(config, launch=launch, **kwargs)
    try:
        process.wait(timeout=180)
    finally:
        process.kill_group()
    return process


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.mktemp("fsdp")
    model = build_tiny_model(base / "model", seed=0, hidden=32)
    data = build_arithmetic_dataset(base / "arith.jsonl", 24, seed=1)
    train = full_train_table(model, data, max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
    reference = run(base / "ref", train)
    assert reference.proc.returncode == 0, reference.log()
    # Rank 0 is SIGKILLed while saving step 4: every shard written, no manifest yet.
    kill = {"FTSUP_FAULT_AT_STEP": "4", "FTSUP_FAULT_POINT": "before_manifest"}
    killed = run(base / "run", train, env=kill)
    assert killed.proc.returncode != 0, killed.log()
    killed_losses = step_losses(killed.own_events())
    out = base / "run" / "out"
    choice = select_resume(out, world_size=2, quarantine=False)
    assert choice.checkpoint is not None, killed.log()
    # The same sealed checkpoint, copied before the resume goes on beside it, for
    # a one-process resume (a GPU lost while the job was down).
    sealed_copy = base / "one" / "out" / choice.checkpoint.path.name
    shutil.copytree(choice.checkpoint.path, sealed_copy)
    resumed = run(base / "run", train, resume_from=choice.checkpoint.path)
    assert resumed.proc.returncode == 0, resumed.log()
    starts = [e for e in resumed.own_events() if e["event"] == "train_start"]
    one = run(base / "one-ref", train, nproc=1)
    assert one.proc.returncode == 0, one.log()
    resized = run(base / "one", train, nproc=1, resume_from=sealed_copy)
    assert resized.proc.returncode == 0, resized.log()
    (resized_start,) = [e for e in resized.own_events() if e["event"] == "train_start"]
    return Runs(
        reference=base / "ref" / "out",
        resumed=out,
        killed_log=killed.log_path.read_text(errors="replace"),  # whole: rank tracebacks are long
        killed_losses=killed_losses,
        resumed_from=choice.checkpoint.path,
        resumed_losses=step_losses(resumed.own_events()),
        reference_losses=step_losses(reference.events()),
        resumed_start_step=starts[0]["step"],
        one_process_losses=step_losses(one.events()),
        resized=base / "one" / "out",
        resized_start=resized_start,
        resized_losses=step_losses(resized.own_events()),
        resized_log=resized.log_path.read_text(errors="replace"),
    )


def dcp_state(folder: Path, tmp: Path) -> dict[str, Any]:
    """A DCP folder's tensors, read back with torch's own offline converter."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{folder.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(target))
    state: dict[str, Any] = torch.load(target, weights_only=False)
    return state


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    import torch

    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"differs from the uninterrupted run: {where}"
    else:
        assert a == b, where


def test_fsdp_resume_after_a_rank_died_during_a_save_is_exact(runs: Runs, tmp_path: Path) -> None:
    # The killed run (from scratch) matched the reference bit for bit up to its kill.
    assert [step for step, _ in runs.killed_losses] == [1, 2, 3, 4]
    assert runs.killed_losses == runs.reference_losses[:4]
    assert "FSDP: every rank writes its own shards" in runs.killed_log
    # The save of step 4 never sealed: the supervisor resumes checkpoint 2.
    assert runs.resumed_from.name == "checkpoint-2", runs.killed_log
    assert runs.resumed_start_step == 2
    retired = [p.name for p in runs.resumed.iterdir() if p.name.startswith("checkpoint-4.")]
    assert retired and retired[0].startswith("checkpoint-4.invalid-incomplete"), retired
    assert runs.resumed_losses == runs.reference_losses[2:]
    final = f"checkpoint-{MAX_STEPS}"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert_identical(
            dcp_state(runs.resumed / final / folder, tmp_path),
            dcp_state(runs.reference / final / folder, tmp_path),
            folder,
        )


def test_the_model_is_sharded_and_every_shard_is_sealed(runs: Runs) -> None:
    """Sharded, not silently DDP (full weights in model.safetensors); each rank's
    shard is in the manifest, which rank 0 wrote after all ranks' files."""
    ckpt = runs.resumed / f"checkpoint-{MAX_STEPS}"
    assert not (ckpt / "model.safetensors").exists()
    listed = {entry.path for entry in read_manifest(ckpt).files}
    assert set(SHARDS) <= listed
    report = validate_checkpoint(ckpt, require_manifest=True, world_size=2)
    assert report.valid and report.resumable, report


def test_a_checkpoint_of_two_processes_resumes_on_one(runs: Runs) -> None:
    """DCP reshards the two ranks' weights and optimizer state onto one rank; the
    global batch is kept (accumulation 1 -> 2) and the data position with it."""
    expected = dict(runs.one_process_losses)
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))
    assert len({round(loss, 4) for loss in expected.values()}) == MAX_STEPS
    start = runs.resized_start
    assert (start["step"], start["world_size"], start["gradient_accumulation_steps"]) == (2, 1, 2)
    assert start["resumed_from"].endswith("one/out/checkpoint-2")
    assert [step for step, _ in runs.resized_losses] == [3, 4, 5, 6]
    for step, loss in runs.resized_losses:
        assert math.isclose(loss, expected[step], rel_tol=REL_TOL), (
            f"step {step}: loss {loss} != one-process reference {expected[step]}"
        )
    summary = "world size 2 -> 1, accumulation 1 -> 2, global batch 4 kept"
    assert summary in runs.resized_log, runs.resized_log
    sealed = runs.resized / "checkpoint-2"
    assert read_manifest(sealed).world_size == 2
    report = validate_checkpoint(sealed, require_manifest=True, deep=True)
    assert report.valid and not report.notes, report  # resharded on load, never rewritten
    final = runs.resized / f"checkpoint-{MAX_STEPS}"
    manifest = read_manifest(final)
    assert manifest.world_size == 1 and manifest.fingerprint["global_batch"] == GLOBAL_BATCH
    one_rank = [".metadata", "__0_0.distcp"]
    assert sorted(p.name for p in (final / "optimizer_0").iterdir()) == one_rank


def test_export_consolidates_the_shards_into_a_standalone_model(runs: Runs, tmp_path: Path) -> None:
    """`ftsup export` of a sealed FSDP checkpoint: one model folder that
    from_pretrained loads, every tensor equal to the DCP shards'."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = runs.resumed / f"checkpoint-{MAX_STEPS}"
    listed = {entry.path for entry in read_manifest(ckpt).files}
    assert {"config.json", "tokenizer_config.json"} <= listed  # self-contained, sealed
    out = tmp_path / "model"
    env = {**os.environ, **TRAINER_ENV}
    argv = [sys.executable, "-m", "ftsup.supervisor", "export", str(ckpt), "--out", str(out)]
    done = subprocess.run([*argv, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["out"] == str(out)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    shards = dcp_state(ckpt / "pytorch_model_fsdp_0", tmp_path)["model"]
    exported = model.state_dict()
    assert sorted(shards) == sorted(exported)
    assert_identical(dict(exported), shards, "exported")
    assert AutoTokenizer.from_pretrained(str(out)) is not None


@pytest.fixture
def copy(runs: Runs, tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of a real sealed checkpoint (step 4 of the reference) to damage."""
    target = tmp_path / "checkpoint-4"
    shutil.copytree(runs.reference / "checkpoint-4", target)
    yield target


def test_export_without_config_uses_the_model_the_manifest_records(
    copy: Path, tmp_path: Path
) -> None:
    """A checkpoint without config.json beside its shards (written by an older
    ftsup): the model the manifest's fingerprint names gives the architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftsup.trainer.export import export_model

    (copy / "config.json").unlink()
    out = export_model(copy, None, tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert_identical(
        dict(model.state_dict()), dcp_state(copy / "pytorch_model_fsdp_0", tmp_path)["model"]
    )


def test_truncated_rank_shard_is_refused_with_and_without_manifest(copy: Path) -> None:
    shard = copy / "optimizer_0" / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    report = validate_checkpoint(copy, require_manifest=True, world_size=2)
    assert not report.valid and "optimizer_0/__1_0.distcp" in "\n".join(report.problems), report
    # Without the manifest (a foreign run): DCP's .metadata says how long it must be.
    (copy / MANIFEST_NAME).unlink()
    report = validate_checkpoint(copy)
    assert not report.valid
    assert "optimizer_0/__1_0.distcp truncated" in str(report.reason), report


def test_missing_rank_shard_is_refused_without_world_size(copy: Path) -> None:
    (copy / MANIFEST_NAME).unlink()
    assert validate_checkpoint(copy).valid
    (copy / "pytorch_model_fsdp_0" / "__1_0.distcp").unlink()
    report = validate_checkpoint(copy)
    assert not report.valid
    assert "pytorch_model_fsdp_0/__1_0.distcp missing" in str(report.reason), report


def test_missing_metadata_is_refused(copy: Path) -> None:
    (copy / MANIFEST_NAME).unlink()
    (copy / "optimizer_0" / ".metadata").unlink()
    report = validate_checkpoint(copy)
    assert not report.valid
    assert "optimizer_0/.metadata missing" in "\n".join(report.problems), report
    assert select_resume(copy.parent, world_size=2, quarantine=False).checkpoint is None


def test_metadata_naming_foreign_code_is_not_unpickled(copy: Path, tmp_path: Path) -> None:
    """`.metadata` is a pickle: one naming anything outside torch's vocabulary is never run."""
    import pickle

    marker = tmp_path / "ran"
    payload = pickle.dumps(_Evil(str(marker)))
    (copy / "optimizer_0" / ".metadata").write_bytes(payload)
    report = validate_checkpoint(copy)
    assert not marker.exists()
    assert "optimizer_0/.metadata not read: it names posix.mkdir" in report.notes, report


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


SPEC = """
[job]
name = "x"
output_dir = "out"
{body}
[launch]
nproc_per_node = 2
{launch}
"""
TRAIN = '[train]\nmodel = "m"\ndataset = "d.jsonl"\nfinetuning_type = "full"\n'


def spec(tmp_path: Path, body: str, launch: str) -> Any:
    return parse_spec(SPEC.format(body=body, launch=launch), tmp_path / "job.toml")


def test_spec_fsdp_field_and_its_checks(tmp_path: Path) -> None:
    launch = spec(tmp_path, TRAIN, 'fsdp = "shard_grad_op"').launch
    assert launch.fsdp == "shard_grad_op"
    argv = build_trainer_argv(Path("/r/train.json"), None, launch, "python")
    assert argv[:3] == ["python", "-m", DISTRUN_MODULE] and argv[-2:] == ["--fsdp", "shard_grad_op"]
    single = build_trainer_argv(Path("/r/train.json"), None, LaunchSection(fsdp="full_shard"), "py")
    assert single[2] == DISTRUN_MODULE  # FSDP needs torch.distributed even on one process
    cases = {
        'fsdp = "hybrid"': "expected one of",
        'fsdp = "full_shard"\ndeepspeed = "zero2"': "cannot be combined with [launch] deepspeed",
    }
    for text, message in cases.items():
        with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
            spec(tmp_path, TRAIN, text)
    with pytest.raises(SpecError, match="works only for a \\[train\\] job"):
        spec(tmp_path, '[command]\nargv = ["true"]\n', 'fsdp = "full_shard"')
