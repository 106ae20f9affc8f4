"""A small but real training process for the supervisor's tests.

It behaves like an HF Trainer script where it matters to ftsup: it writes
`checkpoint-<N>/trainer_state.json` (with `log_history`) every `--save-steps`,
resumes from `--resume_from_checkpoint`, appends progress lines to
`FTSUP_PROGRESS_FILE`, saves and exits 75 on SIGTERM, and can be told to crash.
Every executed step is appended to `<output_dir>/steps.log` ("pid step value")
so tests can prove that no step was lost or run twice.

Its "model" is one integer updated deterministically per step, so the final
value proves the run took the same path as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import pickle
import signal
import struct
import sys
import time
import zipfile
from pathlib import Path


def update(value: int, step: int) -> int:
    return (value * 31 + step) % 1_000_003


def expected_final(max_steps: int) -> int:
    value = 1
    for step in range(1, max_steps + 1):
        value = update(value, step)
    return value


def write_safetensors(path: Path, value: int) -> None:
    """A real one-tensor safetensors file (I64[1]), written without torch."""
    header = json.dumps({"value": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})
    header_bytes = header.encode() + b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + struct.pack("<q", value))


def read_safetensors(path: Path) -> int:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return int(struct.unpack("<q", data[8 + length : 16 + length])[0])


def write_torch_zip(path: Path, payload: dict) -> None:
    """The container format of torch.save (a zip archive), written without torch."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(payload))
        archive.writestr("archive/version", "3\n")


PADDING = {"bytes": 0}


def save(output_dir: Path, step: int, value: int, max_steps: int, history: list[dict]) -> None:
    """The file set of an HF Trainer checkpoint, `trainer_state.json` last as HF does."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    if PADDING["bytes"]:
        write_torch_zip(folder / "extra_state.pt", {"pad": b"\0" * PADDING["bytes"]})
    write_safetensors(folder / "model.safetensors", value)
    write_torch_zip(folder / "optimizer.pt", {"step": step})
    write_torch_zip(folder / "scheduler.pt", {"last_epoch": step})
    write_torch_zip(folder / "rng_state.pth", {"python": step})
    state = {"global_step": step, "max_steps": max_steps, "log_history": history[-50:]}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def skipped(step: int) -> bool:
    """Whether ftsup told this run to skip the data of `step` (after a loss anomaly)."""
    for window in filter(None, os.environ.get("FTSUP_SKIP_STEPS", "").split(",")):
        first, last = (int(x) for x in window.split("-"))
        if first <= step <= last:
            return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--step-time", type=float, default=0.05)
    parser.add_argument("--resume_from_checkpoint", type=Path, default=None)
    parser.add_argument(
        "--crash-at",
        type=int,
        action="append",
        default=[],
        help="exit 1 the first time this step is reached (repeatable)",
    )
    parser.add_argument(
        "--crash-always-at", type=int, default=None, help="exit 1 every time this step is reached"
    )
    parser.add_argument(
        "--fail-at-start", type=int, default=None, help="exit with this code before any step"
    )
    parser.add_argument(
        "--hang-at",
        type=int,
        default=None,
        help="the first time this step is reached, sleep forever inside it",
    )
    parser.add_argument(
        "--nan-at",
        type=int,
        action="append",
        default=[],
        help="report a NaN loss at this step, unless FTSUP_SKIP_STEPS skips it",
    )
    parser.add_argument(
        "--save-time", type=float, default=0.0, help="seconds each checkpoint save takes"
    )
    parser.add_argument(
        "--ckpt-padding",
        type=int,
        default=0,
        help="bytes of extra state per checkpoint (to fill disks in tests)",
    )
    parser.add_argument(
        "--hold-file",
        type=Path,
        default=None,
        help="after --hold-at's step, wait while this file exists (a test acts meanwhile)",
    )
    parser.add_argument("--hold-at", type=int, default=None, help="see --hold-file")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM (stubborn)")
    parser.add_argument(
        "--spawn-child",
        action="store_true",
        help="start a sleeping child in the same process group",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="write no progress file (like a plain HF script)"
    )
    args = parser.parse_args()
    out: Path = args.output_dir
    PADDING["bytes"] = args.ckpt_padding
    out.mkdir(parents=True, exist_ok=True)
    print(f"toy trainer pid {os.getpid()} resume={args.resume_from_checkpoint}", flush=True)

    if args.fail_at_start is not None:
        print("RuntimeError: toy failure at start", file=sys.stderr, flush=True)
        return args.fail_at_start
    if args.spawn_child:
        import subprocess

        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])

    # The stack-dump convention of ftsup's hang handling (see docs/health.md).
    faulthandler.register(signal.SIGRTMIN + 2, all_threads=True)
    stop = {"requested": False}

    def on_term(signum: int, frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_term else on_term)

    step, value, history = 0, 1, []
    if args.resume_from_checkpoint is not None:
        state = json.loads((args.resume_from_checkpoint / "trainer_state.json").read_text())
        step = state["global_step"]
        value = read_safetensors(args.resume_from_checkpoint / "model.safetensors")
        history = state["log_history"]

    progress_path = os.environ.get("FTSUP_PROGRESS_FILE")
    progress = open(progress_path, "a") if progress_path and not args.no_progress else None  # noqa: SIM115

    def report(record: dict) -> None:
        if progress is not None:
            progress.write(json.dumps({"ts": time.time(), **record}) + "\n")
            progress.flush()

    report({"event": "train_start", "step": step, "max_steps": args.max_steps})
    steps_log = open(out / "steps.log", "a")  # noqa: SIM115 (open for the whole run)
    while step < args.max_steps:
        time.sleep(args.step_time)
        step += 1
        value = update(value, step)
        loss = 10.0 / step
        if step in args.nan_at and not skipped(step):
            loss = float("nan")  # the data of this step is poison
        steps_log.write(f"{os.getpid()} {step} {value}\n")
        steps_log.flush()
        history.append({"step": step, "loss": loss, "learning_rate": 1e-4})
        report({"event": "step", "step": step, "max_steps": args.max_steps, "loss": loss})
        print(f"step {step} loss {loss:.4f}", flush=True)
        marker = out / f".crashed-at-{step}"
        if step in args.crash_at and not marker.exists():
            marker.touch()
            print(f"RuntimeError: toy crash at step {step}", file=sys.stderr, flush=True)
            return 1
        hang_marker = out / f".hung-at-{step}"
        if args.hang_at == step and not hang_marker.exists():
            hang_marker.touch()
            print(f"hanging inside step {step}", flush=True)
            while True:
                time.sleep(3600)
        if args.hold_file is not None and args.hold_at == step:
            while args.hold_file.exists() and not stop["requested"]:
                time.sleep(0.02)
        if args.crash_always_at == step:
            print(f"RuntimeError: toy crash at step {step}", file=sys.stderr, flush=True)
            return 1
        if step % args.save_steps == 0 or step == args.max_steps:
            report({"event": "checkpoint_start", "step": step})
            time.sleep(args.save_time)
            save(out, step, value, args.max_steps, history)
            report({"event": "checkpoint_saved", "step": step})
        if stop["requested"]:
            save(out, step, value, args.max_steps, history)
            report({"event": "checkpoint_saved", "step": step})
            print(f"stopped at step {step} after saving", flush=True)
            return 75
    (out / "final.json").write_text(json.dumps({"step": step, "value": value}))
    report({"event": "train_end", "step": step})
    print("training finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
