"""The built-in trainer's command line and train.json, as the daemon starts it.

Daemon-side code (stdlib only, no torch): the daemon builds the argv and writes
the configuration; the trainer only reads them.

One process: `python -m ftsup.trainer --config ... [--resume-from ...]`.
Several: the same module under `python -m ftsup.trainer.distrun`, which is
torchrun (`torch.distributed.run`, same arguments) run in-process by a thin
wrapper that keeps ftsup's contract, which plain torchrun breaks: exit code
75 and 2 survive (torchrun turns any worker failure into 1), SIGUSR1/SIGUSR2
reach the workers (they would kill torchrun), SIGTERM is forwarded as a
save-and-stop request, and workers die with the launcher on SIGKILL.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ftsup.supervisor.spec_types import LaunchSection, TrainSection

TRAINER_MODULE = "ftsup.trainer"
DISTRUN_MODULE = "ftsup.trainer.distrun"
STANDBY_MODULE = "ftsup.trainer.standby"


def trainer_args(
    config_path: Path,
    resume_from: Path | None,
    *,
    deepspeed: str | None = None,
    fsdp: str | None = None,
) -> list[str]:
    args = ["--config", str(config_path)]
    if resume_from is not None:
        args += ["--resume-from", str(resume_from)]
    if deepspeed:
        args += ["--deepspeed", deepspeed]
    if fsdp:
        args += ["--fsdp", fsdp]
    return args


RDZV_JOIN_TIMEOUT_S = 7 * 24 * 3600  # how long a node's launcher waits for the others


def rendezvous_id(launch: LaunchSection, job_name: str) -> str:
    """The job's identity across nodes: `[launch] rdzv_id`, else `ftsup-<job name>`
    (the same job file started on every node gives the same id)."""
    return launch.rdzv_id or f"ftsup-{job_name}"


def torchrun_args(launch: LaunchSection, *, rdzv_id: str) -> list[str]:
    """torchrun options for `launch`; single-node runs rendezvous on a free local port."""
    args = [f"--nproc-per-node={launch.nproc_per_node}", "--max-restarts=0"]
    if launch.nnodes == 1:
        return [*args, "--standalone"]
    if not launch.rdzv_endpoint:
        raise ValueError("[launch] nnodes > 1 needs rdzv_endpoint (host:port of node 0)")
    nnodes = f"{launch.min_nodes}:{launch.nnodes}" if launch.elastic_nodes else str(launch.nnodes)
    args += [
        f"--nnodes={nnodes}",
        f"--rdzv-backend={launch.rdzv_backend}",
        f"--rdzv-endpoint={launch.rdzv_endpoint}",
        f"--rdzv-id={launch.rdzv_id or rdzv_id}",
    ]
    if launch.rdzv_backend != "static":
        # A node that is gone is waited for (the daemon shows it), not a failure
        # after torchrun's default 600 s, which would count against max_restarts.
        conf = f"join_timeout={RDZV_JOIN_TIMEOUT_S}"
        if launch.rdzv_last_call is not None:
            conf += f",last_call_timeout={launch.rdzv_last_call:g}"
        args.append(f"--rdzv-conf={conf}")
    if launch.rdzv_backend == "static":
        host, _, port = launch.rdzv_endpoint.rpartition(":")
        args += [f"--node-rank={launch.node_rank}", f"--master-addr={host}"]
        args += [f"--master-port={port}"]
    return args


def build_trainer_argv(
    config_path: Path, resume_from: Path | None, launch: LaunchSection, python: str
) -> list[str]:
    """The argv that runs the built-in trainer for one attempt.

    `[launch] deepspeed` is passed on as `--deepspeed`; such a run always goes
    through the torchrun wrapper, even on one process, since DeepSpeed's engine
    needs torch.distributed's environment (RANK, LOCAL_RANK, MASTER_ADDR).
    `[launch] fsdp` likewise (`--fsdp`): FSDP shards over torch.distributed's group.
    """
    tail = trainer_args(config_path, resume_from, deepspeed=launch.deepspeed, fsdp=launch.fsdp)
    if not launch.distributed and not launch.deepspeed and not launch.fsdp:
        return [python, "-m", TRAINER_MODULE, *tail]
    rdzv_id = rendezvous_id(launch, Path(config_path).parent.name)
    launcher = [python, "-m", DISTRUN_MODULE, *torchrun_args(launch, rdzv_id=rdzv_id)]
    return [*launcher, "-m", TRAINER_MODULE, *tail]


def split_single_process_argv(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(interpreter prefix, trainer arguments) of a one-process trainer argv; None
    for torchrun launches, which a warm standby cannot take over."""
    if len(argv) >= 3 and argv[1:3] == ["-m", TRAINER_MODULE]:
        return argv[:3], argv[3:]
    return None


def standby_argv(trainer_argv: list[str]) -> list[str] | None:
    """The warm standby that can run `trainer_argv` (any resume point), or None."""
    split = split_single_process_argv(trainer_argv)
    if split is None:
        return None
    (python, _, _), args = split
    config = args[args.index("--config") + 1]
    return [python, "-m", STANDBY_MODULE, "--config", config]


def train_json(
    train: TrainSection,
    *,
    output_dir: Path,
    async_save: bool = True,
    job_name: str = "ftsup",
    elastic_global_batch: int | None = None,
    memory: tuple[Path, int, float | None] | None = None,
) -> dict[str, Any]:
    """The `train.json` payload the trainer reads (`--config`): tuples become lists.

    `memory` (folder, every N steps, the most of training time snapshots may take
    or None for the trainer's default): the memory tier's settings (issue 18; see
    the contract's MEMORY_* names); None leaves it off.

    `elastic_global_batch` (an elastic job's per-device batch x accumulation x full
    process count): the trainer recomputes its accumulation from it at whatever
    world size it is started with, so the global batch and data order stay the same.
    """
    payload: dict[str, Any] = {
        "train": {key: _plain(value) for key, value in asdict(train).items()},
        "output_dir": str(output_dir),
        "async_save": async_save,
        "job_name": job_name,
    }
    if elastic_global_batch is not None:
        payload["elastic"] = {"global_batch": elastic_global_batch}
    if memory is not None:
        folder, every, overhead = memory
        payload["memory"] = {"dir": str(folder), "every": every}
        if overhead is not None:  # absent: the trainer's default
            payload["memory"]["max_overhead"] = overhead
    return payload


def write_train_json(path: Path, train: TrainSection, **kwargs: Any) -> Path:
    """Write `train_json(...)` atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(train_json(train, **kwargs), indent=1))
    os.replace(tmp, path)
    return path


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
