"""Turning a job spec into one attempt: the trainer's argv and env, and the shim.

Command jobs run their own argv (plus `resume_args` when a checkpoint exists);
built-in trainer jobs run `python -m ftsup.trainer --config RUN/train.json`,
through torchrun when `[launch]` asks for more than one process.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ftsup.supervisor import contract, memory_tier
from ftsup.supervisor.atomicio import write_json_atomic
from ftsup.supervisor.fingerprint import train_fingerprint
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.private_dirs import user_umask
from ftsup.supervisor.service.sdnotify import clean_child_env
from ftsup.supervisor.spec_types import JobSpec, LaunchSection
from ftsup.supervisor.standby_shim import FIFO_NAME, standby_command
from ftsup.supervisor.trainer_launch import (
    STANDBY_MODULE,
    build_trainer_argv,
    rendezvous_id,
    torchrun_args,
    write_train_json,
)

# Errors of the moment (full or failing disk, no descriptors or memory left): a
# launch that meets one waits and tries again; any other OSError fails the job.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.EAGAIN,
        errno.ESTALE,
    }
)

# torchrun's --nproc-per-node default (torch.distributed.run reads PET_<OPTION>)
ENV_TORCHRUN_NPROC = "PET_NPROC_PER_NODE"
# A spare's shim until its activation names the job's `[restart] stop_grace`.
DEFAULT_GRACE_S = 120.0


@dataclass(frozen=True)
class AttemptPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


def plan_attempt(
    spec: JobSpec,
    layout: Layout,
    *,
    attempt: int,
    resume_from: Path | None,
    base_env: Mapping[str, str],
    devices: tuple[int, ...] | None = None,
) -> AttemptPlan:
    """`devices`: the GPUs the queue allocated (default: the job's `[gpu] devices`)."""
    env = trainer_base_env(base_env)
    env.update(
        {
            contract.ENV_JOB: spec.name,
            contract.ENV_ATTEMPT: str(attempt),
            contract.ENV_OUTPUT_DIR: str(spec.output_dir),
            contract.ENV_PROGRESS_FILE: str(layout.progress_file(spec.name)),
        }
    )
    if resume_from is not None:
        env[contract.ENV_RESUME_FROM] = str(resume_from)
    if spec.launch.nnodes > 1:
        env[contract.ENV_NODES] = str(spec.launch.nnodes)
    devices = devices if devices is not None else spec.gpu.devices
    if devices is not None:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA numbers GPUs as NVML does
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    if spec.command is not None:
        if spec.launch.nnodes > 1:
            env.update(torchrun_env(spec.launch, rendezvous_id(spec.launch, spec.name)))
        if spec.gpu.count is not None and devices:
            # torchrun reads its defaults from PET_*: one process per placed GPU,
            # unless the command line or the job's own env says otherwise
            env[ENV_TORCHRUN_NPROC] = str(len(devices))
        env.update(spec.command.env)
        if spec.command.instrument:
            env["PYTHONPATH"] = os.pathsep.join(
                part for part in (str(bootstrap_dir()), env.get("PYTHONPATH")) if part
            )
        argv = list(spec.command.argv)
        if resume_from is not None:
            argv += [a.replace("{checkpoint}", str(resume_from)) for a in spec.command.resume_args]
        return AttemptPlan(argv, env, spec.command.cwd)
    # torchrun runs through the trainer's wrapper that keeps the exit-code and
    # signal contract (`trainer_launch`); the daemon never imports the trainer.
    assert spec.train is not None  # the spec has exactly one of [command] and [train]
    config_path = layout.run_dir(spec.name) / contract.TRAIN_CONFIG_FILE
    launch = launch_for(spec, devices)
    write_train_json(
        config_path,
        spec.train,
        output_dir=spec.output_dir,
        async_save=spec.checkpoint.async_save,
        job_name=spec.name,
        elastic_global_batch=global_batch(spec) if is_elastic(spec) else None,
        memory=memory_settings(spec, layout),
    )
    argv = build_trainer_argv(config_path, resume_from, launch, sys.executable)
    return AttemptPlan(argv, env, spec.source.parent)


def trainer_base_env(base_env: Mapping[str, str]) -> dict[str, str]:
    """What every attempt's environment starts from, whatever its job: a daemon's
    spare standby is started in exactly this (`spare_plan`)."""
    env = clean_child_env(base_env)  # systemd's notify/watchdog variables stay with the daemon
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spare_plan(base_env: Mapping[str, str], cwd: Path) -> AttemptPlan:
    """A standby of the built-in trainer for no job yet (`daemon/spares.py`)."""
    return AttemptPlan([sys.executable, "-m", STANDBY_MODULE], trainer_base_env(base_env), cwd)


def memory_settings(spec: JobSpec, layout: Layout) -> tuple[Path, int, float | None] | None:
    """The memory tier's folder, interval and time budget for train.json; None when
    it is off."""
    every = memory_tier.memory_every(spec)
    if not every:
        return None
    return memory_tier.memory_dir(spec, layout), every, spec.checkpoint.memory_overhead


def torchrun_env(launch: LaunchSection, rdzv_id: str) -> dict[str, str]:
    """A multi-node `[command]` job's `[launch]` as torchrun's defaults (`PET_<OPTION>`):
    a plain `torchrun script.py` in its argv joins the job's rendezvous with the
    settings the built-in trainer would use (options on the command line still win)."""
    env: dict[str, str] = {}
    for option in torchrun_args(launch, rdzv_id=rdzv_id):
        name, _, value = option.removeprefix("--").partition("=")
        env["PET_" + name.replace("-", "_").upper()] = value
    return env


def launch_for(spec: JobSpec, devices: tuple[int, ...] | None) -> LaunchSection:
    """The job's [launch], with one process per GPU it was placed on when elastic."""
    if spec.gpu.elastic and devices:
        return replace(spec.launch, nproc_per_node=len(devices), nnodes=1)
    return spec.launch


def job_fingerprint(spec: JobSpec, devices: tuple[int, ...] | None) -> dict[str, Any]:
    """The fingerprint the trainer records for this job on `devices` (the drift guard
    compares a checkpoint's with it): the same function, fed what the trainer is fed."""
    assert spec.train is not None
    return train_fingerprint(
        spec.train,
        launch_for(spec, devices).world_size,
        global_batch=global_batch(spec) if is_elastic(spec) else None,
        zero_stage=spec.launch.zero_stage,
        fsdp=bool(spec.launch.fsdp),
    )


def is_elastic(spec: JobSpec) -> bool:
    """The job's world size may change while its global batch stays: `[gpu] elastic`
    (fewer GPUs), or `[launch] min_nodes` below `nnodes` (fewer nodes)."""
    return spec.gpu.elastic or spec.launch.elastic_nodes


def global_batch(spec: JobSpec) -> int:
    """Samples per optimizer step at the job's full size: what an elastic job keeps."""
    assert spec.train is not None
    train = spec.train
    processes = spec.gpu.count if spec.gpu.elastic and spec.gpu.count else spec.launch.world_size
    return train.per_device_train_batch_size * train.gradient_accumulation_steps * processes


def lock_group(spec: JobSpec) -> str | None:
    """A multi-node job's rendezvous id (its nodes share the output lock), else None."""
    return rendezvous_id(spec.launch, spec.name) if spec.launch.nnodes > 1 else None


def spawn_shim(
    spec: JobSpec, layout: Layout, *, attempt: int, plan: AttemptPlan
) -> subprocess.Popen[bytes]:
    """Start the shim in its own session; it outlives the daemon."""
    attempt_dir = layout.attempt_dir(spec.name, attempt)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    (attempt_dir / contract.LOG_FILE).touch()
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
    ]
    group = lock_group(spec)
    if group is not None:  # every node's trainer writes the shared folder
        shim_argv += ["--lock-group", group]
    shim_argv += ["--", *plan.argv]
    return _start_shim(shim_argv, attempt_dir / "shim.log", plan)


def spawn_standby_shim(
    spec: JobSpec | None, standby_dir: Path, *, plan: AttemptPlan, standby_argv: list[str]
) -> subprocess.Popen[bytes]:
    """Start a warm standby (`standby_shim`) that dies with this daemon until activated.
    `spec` None: a daemon's spare, which learns its job from the activation."""
    standby_dir.mkdir(parents=True)
    os.mkfifo(standby_dir / FIFO_NAME, 0o600)
    (standby_dir / contract.LOG_FILE).touch()
    output_dir, job, grace = (
        (None, None, DEFAULT_GRACE_S)
        if spec is None
        else (spec.output_dir, spec.name, spec.restart.stop_grace)
    )
    shim_argv = standby_command(standby_dir, output_dir, job, grace, os.getpid(), standby_argv)
    return _start_shim(shim_argv, standby_dir / "shim.log", plan)


def _start_shim(argv: list[str], log: Path, plan: AttemptPlan) -> subprocess.Popen[bytes]:
    """A shim in its own session (it outlives the daemon), its output in `log`."""
    with log.open("ab") as shim_log:
        return subprocess.Popen(
            argv,
            cwd=plan.cwd,
            env=plan.env,
            stdin=subprocess.DEVNULL,
            stdout=shim_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=user_umask(),  # the daemon's own 077 is for its state, not the user's runs
        )


@functools.cache
def bootstrap_dir() -> Path:
    """The folder of ftsup's `sitecustomize` (trainer/bootstrap), found without
    importing the trainer package (the daemon never loads trainer code)."""
    found = importlib.util.find_spec("ftsup.trainer")
    if found is None or not found.submodule_search_locations:
        raise RuntimeError("ftsup.trainer is not installed beside the supervisor")
    return Path(next(iter(found.submodule_search_locations))) / contract.BOOTSTRAP_DIR_NAME


def default_env() -> dict[str, str]:
    return dict(os.environ)
