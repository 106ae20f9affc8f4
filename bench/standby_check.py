"""The warm standby on this machine: no CUDA before activation, a takeover after.

Builds the demo's tiny model and data, starts a standby (the real
`standby_shim` and `ftsup.trainer.standby`, with this process standing in for
the daemon), waits until it reports ready, and records whether it initialised
CUDA and, where NVML is present, whether any GPU lists it as a compute process
(it must not: a waiting standby costs no GPU memory). Then it activates the
standby for a 20-step run and records how long activation took to the first
step and whether the run finished. Meant for a machine with a GPU (run by
`bench/gpu_check.sh`); on CPU it checks the same protocol.

`--spare` does the same with a daemon's spare (issue 18): started without
`--config` and without `CUDA_VISIBLE_DEVICES`, activated with the job and
`CUDA_VISIBLE_DEVICES` set to the machine's last GPU. The spare may serve any
placement only if CUDA reads the variable at its initialisation, after the
activation: the check records which GPUs list the trainer while it trains
(only the last one may).

    python bench/standby_check.py [--spare] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ftsup.supervisor.atomicio import read_json, write_json_atomic
from ftsup.supervisor.contract import DEVICE_ENV
from ftsup.supervisor.standby_shim import (
    ACTIVATION_FILE,
    FIFO_NAME,
    STANDBY_FILE,
    standby_command,
)
from ftsup.supervisor.trainer_launch import (
    STANDBY_MODULE,
    split_single_process_argv,
    standby_argv,
)
from ftsup.trainer.demo import prepare_demo


def gpu_processes() -> list[int] | None:
    """Pids with a compute context on any GPU; None without NVML."""
    per_gpu = processes_per_gpu()
    return None if per_gpu is None else [pid for pids in per_gpu.values() for pid in pids]


def processes_per_gpu() -> dict[int, list[int]] | None:
    """Pids with a compute context, per GPU index (NVML's, PCI bus order); None
    without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        found = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            found[index] = [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        return found
    finally:
        pynvml.nvmlShutdown()


def gpus_used_until_exit(shim: subprocess.Popen[bytes], pid: int) -> set[int] | None:
    """The GPU indexes that listed `pid` at any look until the shim exited."""
    seen: set[int] | None = set()
    while shim.poll() is None:
        per_gpu = processes_per_gpu()
        if per_gpu is None:
            seen = None
        elif seen is not None:
            seen |= {index for index, pids in per_gpu.items() if pid in pids}
        time.sleep(0.05)
    return seen


def spare_placement(env: dict[str, str]) -> list[int] | None:
    """Set the devices a placement would (in `env`, the activation's); the GPU indexes
    the trainer may then use, None without NVML. Several GPUs: the last one. One:
    hidden (`CUDA_VISIBLE_DEVICES=""`), so that the run must leave it unused, which
    it does only if CUDA read the variable after the spare's imports."""
    gpus = processes_per_gpu()
    if not gpus:
        return None
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if len(gpus) == 1:
        env["CUDA_VISIBLE_DEVICES"] = ""
        return []
    env["CUDA_VISIBLE_DEVICES"] = str(max(gpus))
    return [max(gpus)]


def wait(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise TimeoutError("the standby did not get there in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--spare", action="store_true", help="a daemon's spare (no job yet)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftsup-standby-check-"))
    job = prepare_demo(work / "demo", steps=200 if args.spare else 20, name="standby-check")
    from ftsup.supervisor.spec import load_spec
    from ftsup.supervisor.trainer_launch import build_trainer_argv, write_train_json

    spec = load_spec(job)
    assert spec.train is not None
    config = write_train_json(work / "train.json", spec.train, output_dir=spec.output_dir)
    cold = build_trainer_argv(config, None, spec.launch, sys.executable)
    folder = work / "standby-1"
    folder.mkdir()
    os.mkfifo(folder / FIFO_NAME)
    if args.spare:
        warm = [sys.executable, "-m", STANDBY_MODULE]
        shim_argv = standby_command(folder, None, None, 120.0, os.getpid(), warm)
        spare_env = {k: v for k, v in os.environ.items() if k not in DEVICE_ENV}
        shim = subprocess.Popen(shim_argv, start_new_session=True, env=spare_env, cwd=work)
    else:
        warm = standby_argv(cold) or []
        shim_argv = standby_command(
            folder, spec.output_dir, "standby-check", 120.0, os.getpid(), warm
        )
        shim = subprocess.Popen(shim_argv, start_new_session=True)
    report: dict[str, Any] = {}
    try:
        info = wait(
            lambda: (i := read_json(folder / STANDBY_FILE)) and i["state"] == "ready" and i, 300
        )
        on_gpu = gpu_processes()
        report["waiting"] = {
            "ready_s": info["ready_s"],
            "cuda_initialized": info["cuda_initialized"],
            "standby_on_a_gpu": None if on_gpu is None else info["trainer_pid"] in on_gpu,
        }
        progress = work / "progress.jsonl"
        env = {**os.environ, "FTSUP_PROGRESS_FILE": str(progress), "FTSUP_ATTEMPT": "1"}
        trainer_args = (split_single_process_argv(cold) or ([], []))[1]
        expected = spare_placement(env) if args.spare else None
        activation = {
            "attempt": 1,
            "job": "standby-check",
            "args": trainer_args,
            "env": env,
            "output_dir": str(spec.output_dir),
            "cwd": str(job.parent),
        }
        write_json_atomic(folder / ACTIVATION_FILE, activation)
        attempt = work / "attempt-1"
        folder.rename(attempt)
        activated = time.time()
        (attempt / FIFO_NAME).write_text(f"{attempt}\n")
        used = gpus_used_until_exit(shim, info["trainer_pid"])
        code = shim.wait(600)
        steps = [json.loads(line) for line in progress.read_text().splitlines()]
        first = next(r["ts"] for r in steps if r.get("event") == "step")
        report["activated"] = {
            "shim_exit": code,
            "trainer_exit": (read_json(attempt / "exit.json") or {}).get("returncode"),
            "activation_to_first_step_s": round(first - activated, 3),
            "finished": any(r.get("event") == "train_end" for r in steps),
            "gpus_expected": expected,
            "gpus_used": None if used is None else sorted(used),
        }
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shim.pid, signal.SIGKILL)
        shim.wait()
        shutil.rmtree(work, ignore_errors=True)
    used_gpus = report["activated"]["gpus_used"]
    ok = (
        report["waiting"]["cuda_initialized"] is False
        and report["waiting"]["standby_on_a_gpu"] in (None, False)
        and report["activated"]["trainer_exit"] == 0
        and (expected is None or used_gpus in (None, expected))
    )
    report["ok"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
