"""Helpers for the trainer tests: train.json files and trainer subprocesses.

Every trainer runs as a real `python -m ftsup.trainer` process in its own
process group; `kill_group` SIGKILLs the whole group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftsup.supervisor.spec_types import LaunchSection
from ftsup.supervisor.trainer_launch import build_trainer_argv

# One thread per process: the CI box has 2 shared cores, and the reference and
# resumed runs must use the same thread count to be comparable bit for bit.
TRAINER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def full_train_table(model: Path, data: Path, *, max_steps: int, save_steps: int) -> dict[str, Any]:
    """The [train] table of the sharded tests (ZeRO, FSDP, their resizes): a full
    fine-tune of the tiny model, 2 per device, no accumulation (an elastic run sets
    it from its global batch)."""
    return {
        "model": str(model),
        "dataset": [str(data)],
        "cutoff_len": 64,
        "finetuning_type": "full",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "max_steps": max_steps,
        "save_steps": save_steps,
        "save_total_limit": 5,
        "seed": 5,
    }


def lora_job_text(
    name: str,
    model: Path,
    data: Path,
    out: Path,
    *,
    max_steps: int,
    save_steps: int,
    train_extra: str = "",
    tables: str = "",
) -> str:
    """A LoRA job file on the tiny model, as the daemon tests submit it: no
    dropout (a resumed or re-sharded run must match its reference exactly);
    `train_extra` adds [train] keys, `tables` whole tables after it."""
    return f"""
[job]
name = "{name}"
output_dir = "{out}"

[train]
model = "{model}"
dataset = ["{data}"]
cutoff_len = 64
lora_rank = 4
lora_dropout = 0.0
per_device_train_batch_size = 2
learning_rate = 5e-3
warmup_steps = 1
max_steps = {max_steps}
save_steps = {save_steps}
seed = 5
{train_extra}

{tables}
"""


def node_job_text(
    name: str,
    model: Path,
    data: Path,
    out: Path,
    launch: str,
    *,
    max_steps: int,
    train_extra: str = "",
) -> str:
    """A job file of the two-daemon (two-node) tests: checkpoints every 2 steps, five
    kept, saved synchronously, a short backoff, and `launch` as its [launch]."""
    tables = '[checkpoint]\nasync_save = false\n\n[restart]\nbackoff = "0.5s"\n\n[launch]\n'
    return lora_job_text(
        name,
        model,
        data,
        out,
        max_steps=max_steps,
        save_steps=2,
        train_extra=f"save_total_limit = 5\n{train_extra}",
        tables=tables + launch,
    )


def write_config(run_dir: Path, train: dict[str, Any], *, async_save: bool = True) -> Path:
    """A train.json as the daemon writes it; output in run_dir/out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "train": train,
        "output_dir": str(run_dir / "out"),
        "async_save": async_save,
        "job_name": run_dir.name,
    }
    path = run_dir / "train.json"
    path.write_text(json.dumps(config, indent=1))
    return path


class TrainerProcess:
    """A trainer subprocess with its progress file and log."""

    def __init__(
        self,
        config: Path,
        *,
        resume_from: Path | None = None,
        env: dict[str, str] | None = None,
        launch: LaunchSection | None = None,
    ) -> None:
        run_dir = config.parent
        self.progress = run_dir / "progress.jsonl"
        # Earlier processes of the same run share the file: only this one's lines count.
        self._offset = self.progress.stat().st_size if self.progress.exists() else 0
        self.log_path = run_dir / f"trainer-{time.monotonic_ns()}.log"
        # The daemon's own command line: plain module, or the torchrun wrapper.
        argv = build_trainer_argv(config, resume_from, launch or LaunchSection(), sys.executable)
        full_env = {**os.environ, **TRAINER_ENV, "FTSUP_PROGRESS_FILE": str(self.progress)}
        full_env.update(env or {})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def events(self) -> list[dict[str, Any]]:
        if not self.progress.exists():
            return []
        lines = self.progress.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def own_events(self) -> list[dict[str, Any]]:
        """The lines this process wrote (waits must not be satisfied by an earlier one's)."""
        if not self.progress.exists():
            return []
        with self.progress.open("rb") as handle:
            handle.seek(self._offset)
            lines = handle.read().decode().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting; log:\n{self.log()}")
            time.sleep(0.01)

    def wait_for_step(self, step: int, timeout: float = 120.0) -> None:
        def reached() -> bool:
            return any(e["event"] == "step" and e["step"] >= step for e in self.own_events())

        self.wait_until(reached, timeout)

    def wait_for_saved(self, step: int, timeout: float = 120.0) -> None:
        """Until checkpoint `step` is complete (its manifest may be written asynchronously)."""

        def saved() -> bool:
            return any(
                e["event"] == "checkpoint_saved" and e["step"] == step for e in self.own_events()
            )

        self.wait_until(saved, timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill_group(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill_group()
            self._log.close()

    def log(self, tail: int | None = 6000) -> str:
        """The trainer's output: its last `tail` characters (for assertion messages), or all."""
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]


def step_losses(events: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in events if e["event"] == "step"]
