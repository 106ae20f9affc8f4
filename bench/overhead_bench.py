"""Where ftsup's per-step overhead comes from: one LoRA job, plain HF Trainer vs ftsup's parts.

Issue 18's target: the median step under ftsup (standby warming, asynchronous
saves in the background) at most 3% above plain transformers Trainer on the
same job and data. This runs the chaos benchmark's job (the demo: LoRA rank
16 on the tiny Llama, hidden 128, 4 layers, batch 16, cutoff 64) in one
process, variant after variant, round after round (alternating), so every
variant sees the same machine:

    hf_nosave        plain transformers.Trainer, same model, data, collator, args, no saves
    hf_nodeterm      the same without torch.use_deterministic_algorithms (ftsup sets it)
    ftsup_nocb       ftsup's Trainer class (build_trainer) with FtsupCallback removed
    ftsup_noprogress + FtsupCallback, no progress file (every event dropped)
    ftsup_progress   + progress file (one JSON line per step)
    hf               plain Trainer, HF's synchronous save every --save-steps
    ftsup            ftsup's trainer as the daemon runs it: progress, asynchronous saves
    ftsup_memory     ftsup + the memory tier (issue 18; on by default for LoRA): a snapshot
                     after every step, spaced to at most 2.5% of the time (the default)
    ftsup_memory_all the same with a snapshot after every step whatever it costs
    ftsup_memory_1.5 (any number) the same spaced to at most 1.5% of the time
    ftsup_standby_normal   ftsup + a warm standby warming up beside it, back to back,
                           at normal priority (the standby before issue 18)
    ftsup_standby_idle     the same with the warm-up at SCHED_IDLE / idle I/O (issue 18)

The standby variants start `ftsup.trainer.standby` (the real module) again as
soon as the previous one reported ready, for the whole run: the worst case
(a real job warms one standby per attempt, after its first step). Step
interval i = start of step i to start of step i + 1, the first 2 and the last
left out; "median" is the median over runs of each run's median. Also
measured alone: one ProgressWriter.emit and one FtsupCallback step (µs).

    python bench/overhead_bench.py --runs 3 --steps 300 --threads 1 --json bench/results/o1.json
    python bench/overhead_bench.py --runs 3 --steps 300 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

VARIANTS = (
    "hf_nosave",
    "hf_nodeterm",
    "ftsup_nocb",
    "ftsup_noprogress",
    "ftsup_progress",
    "hf",
    "ftsup",
    "ftsup_memory",
    "ftsup_memory_all",
    "ftsup_standby_normal",
    "ftsup_standby_idle",
)
STANDBY_CODE = (
    "import sys; from ftsup.trainer.standby import main; "
    "sys.exit(main(sys.argv[1:], lower_priority={lower}))"
)


class StepClock:
    """Step starts (wall and process CPU), the thread count, the tokens seen."""

    def __init__(self) -> None:
        self.begins: list[float] = []
        self.cpu: list[float] = []
        self.threads = 0
        self.tokens = 0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                import torch

                clock.threads = torch.get_num_threads()

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.begins.append(time.perf_counter())
                clock.cpu.append(time.process_time())

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock.tokens = int(state.num_input_tokens_seen)

        return Clock()

    def intervals(self, values: list[float]) -> list[float]:
        return [b - a for a, b in itertools.pairwise(values)][2:]


class StandbyLoop(threading.Thread):
    """Warm standbys, one after another, until stopped: each warms, reports ready, and is
    discarded (its socket closed), as the daemon would discard it."""

    def __init__(self, config: Path, *, lower: bool) -> None:
        super().__init__(daemon=True)
        self.argv = [
            sys.executable,
            "-c",
            STANDBY_CODE.format(lower=lower),
            "--config",
            str(config),
        ]
        self.stop = threading.Event()
        self.ready: list[dict[str, Any]] = []
        self.cpu_s = 0.0
        self._child: subprocess.Popen[bytes] | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            env = {**os.environ, "FTSUP_STANDBY_FD": str(theirs.fileno())}
            self._child = subprocess.Popen(
                self.argv,
                pass_fds=[theirs.fileno()],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            theirs.close()
            with contextlib.suppress(OSError):
                message = ours.recv(1 << 20)
                if message:
                    self.ready.append(json.loads(message))
            ours.close()  # discarded: the standby exits
            _, _, usage = os.wait4(self._child.pid, 0)
            self._child.returncode = 0
            self.cpu_s += usage.ru_utime + usage.ru_stime

    def finish(self) -> None:
        self.stop.set()
        child = self._child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()  # a warm-up still running: it is not measured
        self.join()


def run_once(variant: str, config: Any, train_json: Path) -> dict[str, Any]:
    """One training run of `variant`; its step intervals and what ran beside it."""
    import torch
    from transformers import PrinterCallback, Trainer

    from ftsup.trainer.callback import FtsupCallback
    from ftsup.trainer.run import build_trainer, training_arguments

    clock = StepClock()
    progress = config.output_dir / "progress.jsonl"
    if variant.startswith("ftsup") and variant != "ftsup_noprogress":
        os.environ["FTSUP_PROGRESS_FILE"] = str(progress)
    try:
        trainer, ftsup = build_trainer(config, None)
    finally:
        os.environ.pop("FTSUP_PROGRESS_FILE", None)
    if variant.startswith("hf"):
        args = training_arguments(config, has_eval=False)
        args.save_total_limit = config.train.save_total_limit  # HF rotates by itself
        trainer = Trainer(
            model=trainer.model,
            args=args,
            train_dataset=trainer.train_dataset,
            data_collator=trainer.data_collator,
            processing_class=trainer.processing_class,
        )
        if variant == "hf_nodeterm":
            torch.use_deterministic_algorithms(False)
    elif variant == "ftsup_nocb":
        trainer.remove_callback(FtsupCallback)
    trainer.remove_callback(PrinterCallback)  # HF's log lines on stdout: every variant has it
    trainer.add_callback(clock.callback())
    loop = None
    if variant.startswith("ftsup_standby"):
        loop = StandbyLoop(train_json, lower=variant.endswith("idle"))
        loop.start()
    try:
        trainer.train()
    finally:
        if loop is not None:
            loop.finish()
    if variant.startswith("ftsup") and variant != "ftsup_nocb":
        ftsup.checkpointer.wait()
    steps = clock.intervals(clock.begins)
    cpu = clock.intervals(clock.cpu)
    snapshots = [
        record
        for record in map(
            json.loads, progress.read_text().splitlines() if progress.exists() else []
        )
        if record.get("event") == "memory_snapshot" and "stall_s" in record
    ]
    return {
        **snapshot_step_costs(clock.begins, {r["step"] for r in snapshots}),
        "memory_snapshots": len(snapshots) if config.memory else None,
        "memory_stall_ms": statistics.median(r["stall_s"] for r in snapshots) * 1e3
        if snapshots
        else None,
        "step_ms": statistics.median(steps) * 1e3,
        "mean_ms": statistics.fmean(steps) * 1e3,
        "cpu_ms": statistics.median(cpu) * 1e3,
        "torch_threads": clock.threads,
        "tokens_per_step": clock.tokens / max(len(clock.begins), 1),
        "standby_warmups": len(loop.ready) if loop else None,
        "standby_ready_s": statistics.median(r["ready_s"] for r in loop.ready)
        if loop and loop.ready
        else None,
        "standby_priority": loop.ready[0].get("warm_priority") if loop and loop.ready else None,
        "standby_cpu_s": round(loop.cpu_s, 2) if loop else None,
    }


def snapshot_step_costs(begins: list[float], snapshot_steps: set[int]) -> dict[str, float | None]:
    """Step intervals within one run, paired by what the tier did (the noise between
    runs is as large as the effect): the median interval of steps that took a
    snapshot (`with`), of the step after one (`after`: what the snapshot left
    behind, e.g. caches), and of steps with neither (`clean`); ms."""
    groups: dict[str, list[float]] = {"with": [], "after": [], "clean": []}
    for index, (begin, end) in enumerate(itertools.pairwise(begins)):
        step = index + 1  # begins[0] is step 1's start
        if index < 2 or index == len(begins) - 2:
            continue  # as StepClock.intervals: the first two and the last left out
        kind = "with" if step in snapshot_steps else "clean"
        if kind == "clean" and step - 1 in snapshot_steps:
            kind = "after"
        groups[kind].append(end - begin)
    return {
        f"{kind}_snapshot_ms" if kind != "clean" else "clean_ms": (
            statistics.median(values) * 1e3 if values else None
        )
        for kind, values in groups.items()
    }


def micro_costs(work: Path, repeat: int = 3000) -> dict[str, float]:
    """µs per call of the per-step pieces, alone: a progress line, a callback step."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from ftsup.trainer.callback import FtsupCallback
    from ftsup.trainer.progress import ProgressWriter

    writer = ProgressWriter(work / "micro.jsonl")
    began = time.perf_counter()
    for step in range(repeat):
        writer.emit("step", step=step, max_steps=repeat, loss=1.0, lr=1e-3, tokens_per_s=1e4)
    emit_us = (time.perf_counter() - began) / repeat * 1e6
    writer.close()
    callback = FtsupCallback(work / "micro-cb.jsonl", install_signal_handlers=False)
    args = TrainingArguments(output_dir=str(work / "micro"), use_cpu=True, report_to="none")
    state, control = TrainerState(max_steps=repeat), TrainerControl()
    callback.on_train_begin(args, state, control)
    began = time.perf_counter()
    for step in range(repeat):
        state.global_step = step + 1
        callback.on_step_end(args, state, control)
    step_us = (time.perf_counter() - began) / repeat * 1e6
    callback.progress.close()
    return {"progress_emit_us": emit_us, "callback_step_us": step_us}


def build_job(work: Path, steps: int, save_steps: int) -> tuple[Any, Path]:
    """The demo job's [train] (with `steps`), its RunConfig factory input and train.json."""
    from ftsup.supervisor.spec import load_spec
    from ftsup.supervisor.trainer_launch import write_train_json
    from ftsup.trainer.demo import prepare_demo

    spec = load_spec(prepare_demo(work / "demo", steps=steps, name="overhead"))
    assert spec.train is not None
    train = replace(spec.train, save_steps=save_steps)
    return train, write_train_json(work / "train.json", train, output_dir=work / "standby-out")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--busy", type=int, default=0, help="CPU-bound processes beside it (other users' load)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch: also the standbys'
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ftsup-overhead-"))
    train, train_json = build_job(work, args.steps, args.save_steps)
    variants = args.variants.split(",")
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(args.busy)
    ]
    try:
        results = run_all(args, variants, train, train_json, work)
    finally:
        for process in busy:
            process.kill()
            process.wait()
        for folder in Path("/dev/shm").glob(f"ftsup-overhead-{os.getpid()}-*"):
            shutil.rmtree(folder, ignore_errors=True)
    report(args, variants, results, micro_costs(work))
    return 0


def memory_overhead(variant: str) -> float | None:
    """The memory tier's budget of a variant: `ftsup_memory` the default (None),
    `ftsup_memory_all` none (0), `ftsup_memory_1.5` 1.5%."""
    if variant == "ftsup_memory":
        return None
    if variant == "ftsup_memory_all":
        return 0.0
    return float(variant.removeprefix("ftsup_memory_")) / 100


def run_all(
    args: argparse.Namespace, variants: list[str], train: Any, train_json: Path, work: Path
) -> dict[str, list[dict[str, Any]]]:
    """Every variant `args.runs` times, alternating."""
    import torch

    from ftsup.trainer.config import MemoryConfig, RunConfig

    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for run in range(args.runs):
        for variant in variants:
            saves = variant in ("hf", "ftsup") or variant.startswith(("ftsup_standby", "ftsup_mem"))
            memory = None
            if variant.startswith("ftsup_memory"):
                overhead = memory_overhead(variant)
                folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
                memory = MemoryConfig(
                    folder / f"ftsup-overhead-{os.getpid()}-{variant}", 1, overhead
                )
            config = RunConfig(
                train=replace(train, save_steps=args.save_steps if saves else None),
                output_dir=work / f"{variant}-{run}",
                async_save=True,
                memory=memory,
            )
            results[variant].append(run_once(variant, config, train_json))
            torch.use_deterministic_algorithms(True, warn_only=True)  # as build_trainer sets it
            print(f"run {run} {variant}: {results[variant][-1]}", file=sys.stderr)
    return results


def report(
    args: argparse.Namespace,
    variants: list[str],
    results: dict[str, list[dict[str, Any]]],
    micro: dict[str, float],
) -> None:
    base_name = "hf_nosave" if "hf_nosave" in results else variants[0]
    steps = {v: statistics.median(r["step_ms"] for r in runs) for v, runs in results.items()}
    base, hf = steps[base_name], steps.get("hf")
    print(
        f"\nLoRA demo job, {args.steps} steps, save every {args.save_steps} where saving, "
        f"{args.runs} runs, torch threads {args.threads}, {os.cpu_count()} CPUs, "
        f"{args.busy} busy processes beside, "
        f"load {os.getloadavg()[0]:.1f}\n"
    )
    print(
        f"| variant | step median (ms) | vs {base_name} | vs hf | step mean (ms) | CPU/step (ms) "
        "| torch threads | standby warm-ups | standby ready (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for variant, runs in results.items():
        step = steps[variant]
        ready_s = [r["standby_ready_s"] for r in runs if r["standby_ready_s"] is not None]
        summary[variant] = {
            "step_ms": step,
            "per_run_step_ms": [round(r["step_ms"], 2) for r in runs],
            "mean_ms": statistics.median(r["mean_ms"] for r in runs),
            "cpu_ms": statistics.median(r["cpu_ms"] for r in runs),
            "torch_threads": runs[0]["torch_threads"],
            "warmups": sum(r["standby_warmups"] or 0 for r in runs),
            "ready_s": statistics.median(ready_s) if ready_s else None,
            "memory_snapshots": [r["memory_snapshots"] for r in runs],
            "memory_stall_ms": [r["memory_stall_ms"] for r in runs],
        }
        s = summary[variant]
        standby = variant.startswith("ftsup_standby")
        ready = f"{s['ready_s']:.1f}" if s["ready_s"] is not None else "-"
        versus_hf = f"{(step / hf - 1) * 100:+.1f}%" if hf else "-"
        print(
            f"| {variant} | {step:.2f} | {(step / base - 1) * 100:+.1f}% | {versus_hf} | "
            f"{s['mean_ms']:.2f} | {s['cpu_ms']:.2f} | {s['torch_threads']} | "
            f"{s['warmups'] if standby else '-'} | {ready} |"
        )
    for variant, s in summary.items():
        if variant.startswith("ftsup_memory"):
            stalls = ", ".join(f"{v:.2f}" for v in s["memory_stall_ms"] if v is not None)
            print(
                f"\n{variant}: snapshots per run {s['memory_snapshots']} of {args.steps} steps, "
                f"median stall per snapshot (ms) {stalls}"
            )
            paired = [
                "/".join(
                    "-" if r[key] is None else f"{r[key]:.2f}"
                    for key in ("clean_ms", "with_snapshot_ms", "after_snapshot_ms")
                )
                for r in results[variant]
            ]
            print(f"  step median clean / with a snapshot / after one, per run (ms): {paired}")
    print(
        f"\nalone: progress line {micro['progress_emit_us']:.1f} µs, "
        f"FtsupCallback step (with its line) {micro['callback_step_us']:.1f} µs"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "args": vars(args) | {"json": str(args.json)},
            "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "summary": summary,
            "micro": micro,
            "runs": results,
        }
        args.json.write_text(json.dumps(document, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
