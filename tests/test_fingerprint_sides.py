"""The daemon's drift guard compares a checkpoint's fingerprint (written by the
trainer) with the job's (computed by the daemon): both sides must compute the same
thing from the same job, or every resume of such a job is refused. Built here the
way production builds them: the daemon's `job_fingerprint`, and the trainer's
`run_fingerprint` of the train.json and argv the daemon's launch plan gives it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftsup.supervisor.daemon.launcher import job_fingerprint, plan_attempt
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.spec import parse_spec
from ftsup.trainer.run import parse_args, run_config, run_fingerprint

JOB = """[job]
name = "j"
output_dir = "out"
[train]
model = "org/model"
dataset = "d.jsonl"
per_device_train_batch_size = 2
gradient_accumulation_steps = 4
{extra}
"""


@pytest.mark.parametrize(
    "extra",
    [
        "",
        '[launch]\ndeepspeed = "zero3"',
        '[launch]\nfsdp = "full_shard"',
        "[gpu]\ncount = 2\nelastic = true",
    ],
    ids=["plain", "zero3", "fsdp", "elastic"],
)
def test_daemon_and_trainer_compute_the_same_fingerprint(tmp_path: Path, extra: str) -> None:
    spec = parse_spec(JOB.format(extra=extra), tmp_path / "job.toml")
    layout = Layout(tmp_path / "state", tmp_path / "run")
    devices = (0,) if spec.gpu.elastic else None  # one GPU left of two: one process
    plan = plan_attempt(spec, layout, attempt=1, resume_from=None, base_env={}, devices=devices)
    tail = plan.argv[len(plan.argv) - plan.argv[::-1].index("ftsup.trainer") :]
    trainer_side = run_fingerprint(run_config(parse_args(tail)))  # this process: world size 1
    daemon_side = job_fingerprint(spec, devices)
    if not spec.gpu.elastic and spec.launch.world_size != 1:
        daemon_side["world_size"] = 1  # the one thing a test process cannot be
    assert trainer_side == daemon_side
    assert daemon_side["zero_stage"] == (3 if "zero3" in extra else 0)
    assert daemon_side["fsdp"] == ("fsdp" in extra)
