"""A trainer that reports progress only the way uninstrumented trainers do.

`--mode tqdm`: HF Trainer's output, made by the real tqdm as transformers'
`ProgressCallback` makes it (`tqdm(total=max_steps, dynamic_ncols=True)`, the bar
updated to the global step, `bar.write(str(logs))` on a log step with the values
formatted as transformers 5 does). `--mode llamafactory`: LLaMA-Factory's
`trainer_log.jsonl` in the output folder, line for line as its `LogCallback.on_log`
writes it. It never writes `FTSUP_PROGRESS_FILE`; its checkpoints are the toy
trainer's (HF file set, `trainer_state.json` last).

`--hold-at N` stops after step N (after its log line) until `--release` exists,
so a test can look at the supervisor's view of a run between two saves without
depending on timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_trainer import read_safetensors, save, update


def loss_at(step: int) -> float:
    return 10.0 / step


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--mode", choices=("tqdm", "llamafactory"), required=True)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--step-time", type=float, default=0.05)
    parser.add_argument("--hold-at", type=int, default=None)
    parser.add_argument("--release", type=Path, default=None)
    parser.add_argument("--resume_from_checkpoint", type=Path, default=None)
    args = parser.parse_args()
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    step, value, history = 0, 1, []
    if args.resume_from_checkpoint is not None:
        state = json.loads((args.resume_from_checkpoint / "trainer_state.json").read_text())
        step, history = state["global_step"], state["log_history"]
        value = read_safetensors(args.resume_from_checkpoint / "model.safetensors")

    from tqdm import tqdm

    bar = tqdm(total=args.max_steps, dynamic_ncols=True) if args.mode == "tqdm" else None
    shown = 0
    started = time.time()
    while step < args.max_steps:
        time.sleep(args.step_time)
        step += 1
        value = update(value, step)
        if bar is not None:
            bar.update(step - shown)
            shown = step
        if step % args.logging_steps == 0:
            logs: dict[str, Any] = {
                "loss": loss_at(step),
                "learning_rate": 1e-4,
                "epoch": step / 80,
            }
            history.append({**logs, "step": step})
            if bar is not None:
                bar.write(str({k: f"{v:.4g}" for k, v in logs.items()}))
            else:
                write_llamafactory_line(out, step, args.max_steps, logs, started)
        if args.hold_at == step and args.release is not None:
            while not args.release.exists():
                time.sleep(0.05)
        if step % args.save_steps == 0 or step == args.max_steps:
            save(out, step, value, args.max_steps, history)
    if bar is not None:
        bar.close()
    (out / "final.json").write_text(json.dumps({"step": step, "value": value}))
    print("training finished", flush=True)
    return 0


def write_llamafactory_line(
    out: Path, step: int, max_steps: int, logs: dict[str, Any], started: float
) -> None:
    """LLaMA-Factory 0.9.5 `LogCallback.on_log` (`_timing`, then the dict, None values dropped)."""
    elapsed = time.time() - started
    remaining = (max_steps - step) * (elapsed / step)
    line = {
        "current_steps": step,
        "total_steps": max_steps,
        "loss": logs["loss"],
        "lr": logs["learning_rate"],
        "epoch": logs["epoch"],
        "percentage": round(step / max_steps * 100, 2),
        "elapsed_time": str(timedelta(seconds=int(elapsed))),
        "remaining_time": str(timedelta(seconds=int(remaining))),
    }
    with open(out / "trainer_log.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(main())
