"""`[launch] nproc_per_node = 2` on CPU (gloo): same exactness, same contract.

Runs through `build_trainer_argv`, i.e. the daemon's command line: the
`ftsup.trainer.distrun` torchrun wrapper with two worker processes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.manifest import read_manifest
from ftsup.supervisor.procinfo import child_pids
from ftsup.supervisor.spec_types import LaunchSection
from ftsup.supervisor.trainer_launch import build_trainer_argv
from ftsup.trainer.checkpointing import newest_complete_checkpoint
from ftsup.trainer.distrun import exit_code_for
from tests.trainer.trainer_helpers import TrainerProcess, step_losses, write_config

MAX_STEPS = 10
TWO = LaunchSection(nproc_per_node=2)


def train_table(model: Path, data: Path) -> dict[str, Any]:
    return {
        "model": str(model),
        "dataset": [str(data)],
        "cutoff_len": 64,
        "lora_rank": 4,
        "lora_dropout": 0.1,
        "per_device_train_batch_size": 2,
        "learning_rate": 5e-3,
        "max_steps": MAX_STEPS,
        "save_steps": 3,
        "seed": 11,
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"


def test_argv_single_and_distributed() -> None:
    config = Path("/runs/job/train.json")
    single = build_trainer_argv(config, None, LaunchSection(), "/py")
    assert single == ["/py", "-m", "ftsup.trainer", "--config", str(config)]
    multi = build_trainer_argv(config, Path("/ck"), TWO, "/py")
    assert multi[:3] == ["/py", "-m", "ftsup.trainer.distrun"]
    assert "--nproc-per-node=2" in multi and "--standalone" in multi
    assert multi[-6:] == ["-m", "ftsup.trainer", "--config", str(config), "--resume-from", "/ck"]
    nodes = LaunchSection(nproc_per_node=4, nnodes=2, rdzv_endpoint="node0:29400")
    argv = build_trainer_argv(config, None, nodes, "/py")
    assert "--nnodes=2" in argv and "--rdzv-endpoint=node0:29400" in argv
    assert "--rdzv-id=ftsup-job" in argv and "--standalone" not in argv
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        build_trainer_argv(config, None, LaunchSection(nnodes=2), "/py")


def test_exit_code_mapping() -> None:
    assert exit_code_for(75, [75]) == 75
    assert exit_code_for(75, [-15]) == 75  # torchrun's SIGTERM to a rank already exiting
    assert exit_code_for(75, [-6]) == 75  # ... which aborts in gloo's teardown
    assert exit_code_for(-6, [75]) == 1  # an abort before any stop is a failure
    assert exit_code_for(-15, [2]) == 2
    assert exit_code_for(75, [1]) == 1
    assert exit_code_for(1, [75]) == 1
    assert exit_code_for(-9) == 1
    # torchrun orders failures by the second, ties to the lowest rank: a rank SIGTERMed
    # in the second another exited 75 can come "first". After a forwarded stop a 75
    # with only collateral deaths beside it is the stop; anything else still fails.
    assert exit_code_for(-15, [75], stop_forwarded=True) == 75
    assert exit_code_for(-6, [75], stop_forwarded=True) == 75
    assert exit_code_for(-15, [-9], stop_forwarded=True) == 1  # no rank stopped
    assert exit_code_for(-15, [75, 1], stop_forwarded=True) == 1


@pytest.mark.slow
def test_two_processes_kill_stop_resume_is_bit_exact(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    ref_config = write_config(tmp_path / "ref", train_table(tiny_model, arith_data))
    reference = start_trainer(ref_config, launch=TWO)
    assert reference.wait() == 0, reference.log()
    ref_out = ref_config.parent / "out" / f"checkpoint-{MAX_STEPS}"
    assert {p.name for p in ref_out.glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    assert read_manifest(ref_out).world_size == 2
    expected = dict(step_losses(reference.events()))

    config = write_config(tmp_path / "run", train_table(tiny_model, arith_data))
    out = config.parent / "out"

    # SIGKILL to the launcher's group: the workers (own sessions) must die too.
    first = start_trainer(config, launch=TWO)
    first.wait_for_step(4)
    first.wait_for_saved(3)
    workers = child_pids(first.proc.pid)
    assert len(workers) == 2
    first.kill_group()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "orphaned workers keep training"

    # SIGTERM to the launcher: both ranks save at the same step boundary, exit 75.
    resume = newest_complete_checkpoint(out)
    assert resume is not None and resume.name in ("checkpoint-3", "checkpoint-6")
    second = start_trainer(config, launch=TWO, resume_from=resume)
    second.wait_for_step(6)
    second.signal(signal.SIGTERM)
    assert second.wait() == 75, second.log()
    stopped = newest_complete_checkpoint(out)
    assert stopped is not None
    step = int(stopped.name.split("-")[1])
    assert step >= 6 and (stopped / "rng_state_1.pth").exists()

    last = start_trainer(config, launch=TWO, resume_from=stopped)
    assert last.wait() == 0, last.log()
    final = out / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors"
    assert final.read_bytes() == (ref_out / "adapter_model.safetensors").read_bytes()
    for logged_step, loss in step_losses(last.events()):
        assert loss == expected[logged_step], f"step {logged_step}"
    attempts = split_attempts(last.events())
    assert [e["step"] for e in attempts[1] if e["event"] == "step"][-1] == step
    assert [e["step"] for e in attempts[2] if e["event"] == "step"] == list(
        range(step + 1, MAX_STEPS + 1)
    )


def split_attempts(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Progress events grouped by attempt (each starts with train_start)."""
    attempts: list[list[dict[str, Any]]] = []
    for event in events:
        if event["event"] == "train_start":
            attempts.append([])
        attempts[-1].append(event)
    return attempts
