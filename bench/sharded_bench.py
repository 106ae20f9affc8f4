"""Step time and save stall of sharded fine-tuning in the built-in trainer.

Runs the tiny Llama (trainer/tiny.py) on 2 CPU processes, 24 steps, a checkpoint
every 4, in each mode: LoRA (DDP), a full fine-tune with plain DDP (the
baseline every sharded mode is compared with), DeepSpeed ZeRO-2 and ZeRO-3, and
FSDP2 (`full_shard`). Reads the trainer's own progress events: the median step
time (steps that did not save), the median save stall (training blocked by the
save) and the median time from a save's start to its sealed manifest, and the
size of the last checkpoint.

    python bench/sharded_bench.py [--hidden 32] [--modes lora,ddp,zero2,zero3,fsdp] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftsup.supervisor.spec_types import LaunchSection
from ftsup.trainer.tiny import build_arithmetic_dataset, build_tiny_model
from tests.trainer.trainer_helpers import TrainerProcess, write_config

STEPS, SAVE_EVERY = 24, 4
MODES = ("lora", "ddp", "zero2", "zero3", "fsdp")


def launch_of(mode: str) -> LaunchSection:
    if mode in ("zero2", "zero3"):
        return LaunchSection(nproc_per_node=2, deepspeed=mode)
    if mode == "fsdp":
        return LaunchSection(nproc_per_node=2, fsdp="full_shard")
    return LaunchSection(nproc_per_node=2)


def run_mode(base: Path, model: Path, data: Path, mode: str) -> dict[str, Any]:
    train = {
        "model": str(model),
        "dataset": [str(data)],
        "cutoff_len": 64,
        "finetuning_type": "lora" if mode == "lora" else "full",
        "lora_rank": 8,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "max_steps": STEPS,
        "save_steps": SAVE_EVERY,
        "save_total_limit": 2,
        "logging_steps": 1,
        "seed": 5,
    }
    run_dir = base / mode
    shutil.rmtree(run_dir, ignore_errors=True)
    process = TrainerProcess(write_config(run_dir, train, async_save=True), launch=launch_of(mode))
    try:
        code = process.wait(900)
    finally:
        process.kill_group()
    events = process.events()
    steps = {e["step"]: e["ts"] for e in events if e["event"] == "step"}
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    saves = {e["step"] for e in saved}
    gaps = [
        steps[s] - steps[s - 1] for s in steps if s > 2 and s - 1 in steps and s - 1 not in saves
    ]
    last = run_dir / "out" / f"checkpoint-{STEPS}"
    size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) if last.is_dir() else 0
    return {
        "mode": mode,
        "exit": code,
        "step_ms": 1000 * statistics.median(gaps) if gaps else None,
        "stall_ms": 1000 * statistics.median(e["stall_s"] for e in saved) if saved else None,
        "save_to_manifest_ms": 1000 * statistics.median(e["seconds"] for e in saved)
        if saved
        else None,
        "checkpoint_mb": size / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=32, help="tiny model width (32, 256)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; use {', '.join(MODES)}")
    with tempfile.TemporaryDirectory(prefix="ftsup-sharded-") as tmp:
        base = Path(tmp)
        model = build_tiny_model(base / "model", seed=0, hidden=args.hidden)
        data = build_arithmetic_dataset(base / "arith.jsonl", 96, seed=1)
        rows = [run_mode(base, model, data, mode) for mode in modes]
    for row in rows:
        cells = [
            f"{row['mode']:<6}",
            f"exit {row['exit']}",
            f"step {row['step_ms']:.0f} ms" if row["step_ms"] is not None else "step -",
            f"stall {row['stall_ms']:.0f} ms" if row["stall_ms"] is not None else "stall -",
            f"manifest {row['save_to_manifest_ms']:.0f} ms"
            if row["save_to_manifest_ms"] is not None
            else "manifest -",
            f"checkpoint {row['checkpoint_mb']:.1f} MB",
        ]
        print("  ".join(cells))
    if args.json is not None:
        args.json.write_text(json.dumps({"hidden": args.hidden, "rows": rows}, indent=1))
    return 0 if all(row["exit"] == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
