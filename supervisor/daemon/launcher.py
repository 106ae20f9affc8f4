"""Turning a job spec into one attempt: the trainer's argv and env, and the shim.

Command jobs run their own argv (plus `resume_args` when a checkpoint exists);
built-in trainer jobs run `python -m ftsup.trainer --config RUN/train.json`,
through torchrun when `[launch]` asks for more than one process.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftsup.supervisor.atomicio import write_json_atomic
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.service.sdnotify import clean_child_env
from ftsup.supervisor.shim import LOG_FILE
from ftsup.supervisor.spec_types import JobSpec, LaunchSection


@dataclass(frozen=True)
class AttemptPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


def trainer_config(spec: JobSpec) -> dict[str, Any]:
    """What `python -m ftsup.trainer --config` reads (a snapshot of the spec)."""
    assert spec.train is not None
    train = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec.train).items()
    }
    return {
        "job_name": spec.name,
        "output_dir": str(spec.output_dir),
        "async_save": spec.checkpoint.async_save,
        "train": train,
    }


def torchrun_prefix(launch: LaunchSection, python: str) -> list[str]:
    argv = [python, "-m", "torch.distributed.run", f"--nproc_per_node={launch.nproc_per_node}"]
    if launch.nnodes == 1:
        return [*argv, "--standalone"]
    argv += [f"--nnodes={launch.nnodes}", f"--rdzv_backend={launch.rdzv_backend}"]
    if launch.rdzv_endpoint:
        argv.append(f"--rdzv_endpoint={launch.rdzv_endpoint}")
    if launch.rdzv_id:
        argv.append(f"--rdzv_id={launch.rdzv_id}")
    return argv


def plan_attempt(
    spec: JobSpec,
    layout: Layout,
    *,
    attempt: int,
    resume_from: Path | None,
    base_env: Mapping[str, str],
) -> AttemptPlan:
    env = clean_child_env(base_env)  # systemd's notify/watchdog variables stay with the daemon
    env.update(
        {
            "FTSUP_JOB": spec.name,
            "FTSUP_ATTEMPT": str(attempt),
            "FTSUP_OUTPUT_DIR": str(spec.output_dir),
            "FTSUP_PROGRESS_FILE": str(layout.progress_file(spec.name)),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if resume_from is not None:
        env["FTSUP_RESUME_FROM"] = str(resume_from)
    if spec.gpu.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in spec.gpu.devices)
    if spec.command is not None:
        env.update(spec.command.env)
        argv = list(spec.command.argv)
        if resume_from is not None:
            argv += [a.replace("{checkpoint}", str(resume_from)) for a in spec.command.resume_args]
        return AttemptPlan(argv, env, spec.command.cwd)
    config_path = layout.run_dir(spec.name) / "train.json"
    write_json_atomic(config_path, trainer_config(spec))
    python = sys.executable
    module = ["-m", "ftsup.trainer", "--config", str(config_path)]
    if resume_from is not None:
        module += ["--resume-from", str(resume_from)]
    if spec.launch.distributed:
        argv = [*torchrun_prefix(spec.launch, python), *module]
    else:
        argv = [python, *module]
    return AttemptPlan(argv, env, spec.source.parent)


def spawn_shim(
    spec: JobSpec, layout: Layout, *, attempt: int, plan: AttemptPlan
) -> subprocess.Popen[bytes]:
    """Start the shim in its own session; it outlives the daemon."""
    attempt_dir = layout.attempt_dir(spec.name, attempt)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    (attempt_dir / LOG_FILE).touch()
    write_json_atomic(attempt_dir / "command.json", {"argv": plan.argv, "cwd": str(plan.cwd)})
    shim_argv = [
        sys.executable,
        "-m",
        "ftsup.supervisor.shim",
        "--attempt-dir",
        str(attempt_dir),
        "--output-dir",
        str(spec.output_dir),
        "--job",
        spec.name,
        "--attempt",
        str(attempt),
        "--grace",
        str(spec.restart.stop_grace),
        "--",
        *plan.argv,
    ]
    shim_log = (attempt_dir / "shim.log").open("ab")
    try:
        return subprocess.Popen(
            shim_argv,
            cwd=plan.cwd,
            env=plan.env,
            stdin=subprocess.DEVNULL,
            stdout=shim_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        shim_log.close()


def default_env() -> dict[str, str]:
    return dict(os.environ)
