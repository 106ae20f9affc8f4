"""Built-in trainer vs plain transformers Trainer: step time, checkpoint stall, write speed.

Same model, data and TrainingArguments for both; the built-in trainer adds
FtsupCallback (progress, signal flags, per-step all-reduce when distributed)
and the manifest (fsync + sha256 of every file, on a thread when async) and
its own rotation. Each configuration is run `--runs` times, alternating, and
medians are reported.

    python bench/trainer_bench.py --runs 3 --steps 60 --save-steps 10
    python bench/trainer_bench.py --finetuning-type full --hidden 256 --layers 4
    # issue 8's target, ~83M parameters, full fine-tuning (async save vs HF's sync save):
    python bench/trainer_bench.py --finetuning-type full --hidden 768 --layers 14 \
        --batch-size 2 --cutoff-len 32 --steps 20 --save-steps 4 --runs 2

Step interval i = time between the starts of steps i and i+1; the stall of a
checkpoint is the median interval of steps that saved minus the median of
steps that did not (the last step is left out: its interval also holds the
end of training, where the built-in trainer waits for its background write).
"reported" is the trainer's own figure: the median `stall_s` of the
built-in trainer's `checkpoint_saved` records (time training was blocked),
and for transformers the duration of its synchronous save (both without the
last checkpoint). Wall times suffer from other load on the machine, so the
same is reported in process CPU time (all threads): "CPU / ckpt" is all CPU
spent beyond plain steps divided by the number of checkpoints, including an
async manifest thread wherever it ran.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from ftsup.trainer.config import RunConfig, train_section_from_dict
from ftsup.trainer.run import build_trainer, training_arguments
from ftsup.trainer.tiny import build_arithmetic_dataset, build_tiny_model


class StepClock(TrainerCallback):  # type: ignore[misc]
    """Records when each step starts and which steps saved, and how long HF's save took."""

    def __init__(self) -> None:
        self.begins: list[float] = []
        self.cpu: list[float] = []  # process CPU time (all threads) at the same moments
        self.saved_steps: set[int] = set()
        self.save_seconds: list[float] = []
        self._step_end = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.begins.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._step_end = time.perf_counter()

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.saved_steps.add(state.global_step)
        self.save_seconds.append(time.perf_counter() - self._step_end)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # Runs after FtsupCallback.on_train_end, i.e. after any async manifest finished.
        self.begins.append(time.perf_counter())
        self.cpu.append(time.process_time())


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _split(values: list[float], saved: set[int]) -> tuple[list[float], list[float]]:
    """Intervals of steps without and with a save; interval i is step i + 1 (1-based)."""
    intervals = [b - a for a, b in itertools.pairwise(values)]
    last = len(intervals)
    plain = [t for i, t in enumerate(intervals, 1) if 2 < i < last and i not in saved]
    saving = [t for i, t in enumerate(intervals, 1) if 2 < i < last and i in saved]
    return plain, saving


def reported_stalls(progress: Path, last_step: int) -> list[float]:
    """`stall_s` of every checkpoint but the last, from the built-in trainer's progress file."""
    if not progress.exists():
        return []
    records = [json.loads(line) for line in progress.read_text().splitlines()]
    return [
        float(r["stall_s"])
        for r in records
        if r.get("event") == "checkpoint_saved" and r.get("step") != last_step
    ]


def measure(
    clock: StepClock, checkpoint: Path | None, stalls: list[float] | None = None
) -> dict[str, float]:
    plain, saving = _split(clock.begins, clock.saved_steps)
    cpu_plain, cpu_saving = _split(clock.cpu, clock.saved_steps)
    step, cpu_step = statistics.median(plain), statistics.median(cpu_plain)
    # All CPU spent beyond plain steps, per checkpoint: includes an async manifest
    # thread wherever it ran (the last interval includes waiting for it).
    cpu_total = sum(cpu_plain) + sum(cpu_saving)
    cpu_extra = (cpu_total - cpu_step * (len(cpu_plain) + len(cpu_saving))) / max(len(saving), 1)
    size = folder_size(checkpoint) if checkpoint else 0
    save = statistics.median(clock.save_seconds) if clock.save_seconds else float("nan")
    if stalls is None:  # transformers: its save is the stall (the last one left out)
        stalls = clock.save_seconds[:-1] or clock.save_seconds
    reported = statistics.median(stalls) if stalls else float("nan")
    return {
        "step_s": step,
        "stall_s": statistics.median(saving) - step if saving else float("nan"),
        "save_s": save,
        "reported_stall_s": reported,
        "step_cpu_s": cpu_step,
        "ckpt_cpu_s": cpu_extra,
        "ckpt_mb": size / 1e6,
        "write_mb_s": size / 1e6 / save if save > 0 else float("nan"),
    }


def run_once(kind: str, config: RunConfig) -> dict[str, float]:
    clock = StepClock()
    progress = config.output_dir / "progress.jsonl"
    stalls: list[float] | None = None
    if kind == "ftsup":
        os.environ["FTSUP_PROGRESS_FILE"] = str(progress)
        try:
            trainer, ftsup = build_trainer(config, None)
        finally:
            del os.environ["FTSUP_PROGRESS_FILE"]
        trainer.add_callback(clock)
        trainer.train()
        ftsup.checkpointer.wait()
        stalls = reported_stalls(progress, config.train.max_steps)
    else:
        built, _ = build_trainer(config, None)  # same model, data and collator
        args = training_arguments(config, has_eval=False)
        args.save_total_limit = config.train.save_total_limit  # HF rotates by itself
        trainer = Trainer(
            model=built.model,
            args=args,
            train_dataset=built.train_dataset,
            data_collator=built.data_collator,
            processing_class=built.processing_class,
            callbacks=[clock],
        )
        trainer.train()
    last = config.output_dir / f"checkpoint-{config.train.max_steps}"
    return measure(clock, last if last.exists() else None, stalls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=64)
    parser.add_argument("--finetuning-type", choices=("lora", "full"), default="lora")
    parser.add_argument(
        "--sync", action="store_true", help="async_save = false: HF's save, manifest inline"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ftsup-bench-"))
    model = build_tiny_model(work / "model", hidden=args.hidden, layers=args.layers)
    data = build_arithmetic_dataset(work / "data.jsonl", 2000, seed=1)
    train = train_section_from_dict(
        {
            "model": str(model),
            "dataset": [str(data)],
            "finetuning_type": args.finetuning_type,
            "max_steps": args.steps,
            "save_steps": args.save_steps,
            "save_total_limit": 2,
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": 1e-3,
            "cutoff_len": args.cutoff_len,
            "logging_steps": 1,
        }
    )
    results: dict[str, list[dict[str, float]]] = {"transformers": [], "ftsup": []}
    for run in range(args.runs):
        for kind in results:
            out = work / f"{kind}-{run}"
            config = RunConfig(train=train, output_dir=out, async_save=not args.sync)
            results[kind].append(run_once(kind, replace(config)))
            print(f"run {run} {kind}: {results[kind][-1]}", file=sys.stderr)

    keys = (
        "step_s",
        "stall_s",
        "reported_stall_s",
        "save_s",
        "step_cpu_s",
        "ckpt_cpu_s",
        "ckpt_mb",
        "write_mb_s",
    )
    medians = {
        k: {m: statistics.median(r[m] for r in rs) for m in keys} for k, rs in results.items()
    }
    print(
        f"\n{args.finetuning_type}, hidden {args.hidden}, {args.layers} layers, "
        f"batch {args.batch_size}, {args.steps} steps, save every {args.save_steps}, "
        f"{args.runs} runs, {'sync' if args.sync else 'async'} save, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}\n"
    )
    print(
        "| trainer | step (ms) | stall / ckpt (ms) | reported stall (ms) | save (ms) "
        "| step CPU (ms) | CPU / ckpt (ms) | ckpt (MB) | write (MB/s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, m in medians.items():
        print(
            f"| {kind} | {m['step_s'] * 1e3:.1f} | {m['stall_s'] * 1e3:.1f} | "
            f"{m['reported_stall_s'] * 1e3:.1f} | "
            f"{m['save_s'] * 1e3:.1f} | {m['step_cpu_s'] * 1e3:.1f} | "
            f"{m['ckpt_cpu_s'] * 1e3:.1f} | "
            f"{m['ckpt_mb']:.2f} | {m['write_mb_s']:.0f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "medians": medians,
                    "runs": results,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
