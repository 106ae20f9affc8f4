"""The warm standby on this machine: no CUDA before activation, a takeover after.

Builds the demo's tiny model and data, starts a standby (the real
`standby_shim` and `ftsup.trainer.standby`, with this process standing in for
the daemon), waits until it reports ready, and records whether it initialised
CUDA and, where NVML is present, whether any GPU lists it as a compute process
(it must not: a waiting standby costs no GPU memory). Then it activates the
standby for a 20-step run and records how long activation took to the first
step and whether the run finished. Meant for a machine with a GPU (run by
`bench/gpu_check.sh`); on CPU it checks the same protocol.

    python bench/standby_check.py [--out FILE]
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
from ftsup.supervisor.standby_shim import (
    ACTIVATION_FILE,
    FIFO_NAME,
    STANDBY_FILE,
    standby_command,
)
from ftsup.supervisor.trainer_launch import split_single_process_argv, standby_argv
from ftsup.trainer.demo import prepare_demo


def gpu_processes() -> list[int] | None:
    """Pids with a compute context on any GPU; None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        pids = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pids += [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        return pids
    finally:
        pynvml.nvmlShutdown()


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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftsup-standby-check-"))
    job = prepare_demo(work / "demo", steps=20, name="standby-check")
    from ftsup.supervisor.spec import load_spec
    from ftsup.supervisor.trainer_launch import build_trainer_argv, write_train_json

    spec = load_spec(job)
    assert spec.train is not None
    config = write_train_json(work / "train.json", spec.train, output_dir=spec.output_dir)
    cold = build_trainer_argv(config, None, spec.launch, sys.executable)
    folder = work / "standby-1"
    folder.mkdir()
    os.mkfifo(folder / FIFO_NAME)
    warm = standby_argv(cold) or []
    shim_argv = standby_command(folder, spec.output_dir, "standby-check", 120.0, os.getpid(), warm)
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
        activation = {"attempt": 1, "job": "standby-check", "args": trainer_args, "env": env}
        write_json_atomic(folder / ACTIVATION_FILE, activation)
        attempt = work / "attempt-1"
        folder.rename(attempt)
        activated = time.time()
        (attempt / FIFO_NAME).write_text(f"{attempt}\n")
        code = shim.wait(600)
        steps = [json.loads(line) for line in progress.read_text().splitlines()]
        first = next(r["ts"] for r in steps if r.get("event") == "step")
        report["activated"] = {
            "shim_exit": code,
            "trainer_exit": (read_json(attempt / "exit.json") or {}).get("returncode"),
            "activation_to_first_step_s": round(first - activated, 3),
            "finished": any(r.get("event") == "train_end" for r in steps),
        }
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shim.pid, signal.SIGKILL)
        shim.wait()
        shutil.rmtree(work, ignore_errors=True)
    ok = (
        report["waiting"]["cuda_initialized"] is False
        and report["waiting"]["standby_on_a_gpu"] in (None, False)
        and report["activated"]["trainer_exit"] == 0
    )
    report["ok"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
