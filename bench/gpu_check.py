"""Run ftsup's GPU health code against the real NVML and print what it read.

Run through bench/gpu_check.sh on a machine with an NVIDIA GPU. It starts the
GPU monitor (sampling + XID registration), puts a matmul load on every GPU in a
child process (when torch with CUDA is installed) so that utilisation, power
and clocks move, captures the child's stacks mid-run (py-spy, else the
faulthandler signal), lets it finish, classifies its exit, checks that its
GPU memory is released, and runs the pre-launch checks. Everything read goes
to one JSON file; a summary goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOAD_EXIT_NO_CUDA = 3


def load(seconds: float) -> int:
    """The child: matmuls on every visible GPU; faulthandler on ftsup's stack-dump signal."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGRTMIN + 2, file=sys.stderr, all_threads=True)
    try:
        import torch
    except ImportError:
        print("torch is not installed: no load", flush=True)
        return LOAD_EXIT_NO_CUDA
    if not torch.cuda.is_available():
        print("torch has no CUDA here: no load", flush=True)
        return LOAD_EXIT_NO_CUDA
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    mats = [torch.randn(8192, 8192, device=d, dtype=torch.float16) for d in devices]
    end, step = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        for m in mats:
            m.copy_(torch.tanh(m @ m))
        for d in devices:
            torch.cuda.synchronize(d)
        step += 1
        if step % 20 == 0:
            print(f"step {step}", flush=True)
    print(f"load done after {step} steps on {len(devices)} GPU(s)", flush=True)
    return 0


def check(seconds: float, out: Path, nvml: Any = None) -> int:
    """The parent; `nvml` is the pynvml module to use (default: the real one)."""
    from ftsup.supervisor.cli.gpus_cmd import read_gpus
    from ftsup.supervisor.health.diagnosis import classify_failure
    from ftsup.supervisor.health.gpu import GpuEvent, GpuMonitor
    from ftsup.supervisor.health.gpu_checks import (
        check_devices,
        supports_bf16,
        wait_for_memory_release,
    )
    from ftsup.supervisor.health.nvml import NvmlUnavailable
    from ftsup.supervisor.health.stacks import capture_stacks

    report: dict[str, Any] = {"started": time.time(), "host": os.uname().nodename}
    events: list[dict[str, Any]] = []

    def on_event(event: GpuEvent) -> None:
        events.append(event.to_dict())
        print(f"event: {event.message} -> {event.action}", flush=True)

    try:
        report["reading"] = read_gpus(nvml)
    except NvmlUnavailable as err:
        report["reading"] = {"available": False, "reason": str(err)}
    monitor = GpuMonitor(nvml=nvml, interval=0.5, history=10_000, on_event=on_event)
    status = monitor.start()
    report["status"] = status.__dict__
    print(status.message, flush=True)
    if not status.active:
        _write(out, report)
        return 1
    indices = monitor.indices()
    report["checks"] = {
        "check_devices": check_devices(indices, nvml=nvml, monitor=monitor),
        "supports_bf16": {str(i): supports_bf16(i, nvml=nvml) for i in indices},
    }
    time.sleep(min(3.0, seconds / 4))  # an idle baseline
    log = out.parent / "gpu_check_load.log"
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    with log.open("w") as sink:
        child = subprocess.Popen(
            [sys.executable, __file__, "--load", str(max(5.0, seconds - 5))],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    time.sleep(min(8.0, seconds / 2))
    if child.poll() is None:
        report["stacks"] = capture_stacks([child.pid], out.parent / "gpu_check_stacks.txt", 30)
        print(f"stacks: {report['stacks']}", flush=True)
    code = child.wait(timeout=seconds + 120)
    tail = log.read_text(errors="replace")[-4000:]
    if code == LOAD_EXIT_NO_CUDA:
        report["load"] = {"ran": False, "log": tail}
    else:
        diagnosis = classify_failure(code, None, tail)
        verdict = {"kind": diagnosis.kind.value, "reason": diagnosis.reason}
        report["load"] = {"ran": True, "exit": code, "log": tail, "diagnosis": verdict}
        report["memory_release"] = wait_for_memory_release(indices, [child.pid], 30, nvml=nvml)
    time.sleep(min(2.0, seconds / 4))
    report["snapshot"] = monitor.snapshot()
    report["series"] = {str(i): monitor.series(i) for i in indices}
    report["events"] = events
    monitor.stop()
    report["stopped_status"] = monitor.status.__dict__
    _write(out, report)
    _summarise(report)
    return 0


def _summarise(report: dict[str, Any]) -> None:
    for index, samples in report["series"].items():
        utils = [s["util_gpu"] for s in samples if "util_gpu" in s]
        power = [s["power_w"] for s in samples if "power_w" in s]
        keys = sorted({k for s in samples for k in s})
        print(
            f"GPU {index}: {len(samples)} samples; util max {max(utils, default=None)}%; "
            f"power max {max(power, default=None)} W; fields: {', '.join(keys)}"
        )
    print(f"load: {report['load']}"[:400])
    print(f"checks: {report['checks']}; memory release: {report.get('memory_release')}")


def _write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
    print(f"wrote {out}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    parser.add_argument("--load", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load is not None:
        return load(args.load)
    return check(args.seconds, args.out)


if __name__ == "__main__":
    sys.exit(main())
