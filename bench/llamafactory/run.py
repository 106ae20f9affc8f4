"""LLaMA-Factory 0.9.5, unmodified, under ftsup: does it get the same contract?

An LF SFT + LoRA run of a tiny local Llama (CPU, `llamafactory-cli train
cfg.yaml`, LF in its own cached venv: setup_venv.sh) runs as a `[command]`
job of a private ftsup daemon, three ways (scenarios.py):

    reference        the same command alone, never interrupted
    instrumented     bootstrap on: live steps, `ftsup save`, `ftsup stop`, restart
    uninstrumented   `instrument = false`: SIGKILL + resume, `ftsup stop`, restart

and checks the facts that separate right from wrong: each step and its loss
live before the first checkpoint; a checkpoint at the step of `ftsup save`; a
stop that saves the step reached and ends `stopped` (exit 75); the restart
resumes at that step (ftsup's resume_from and transformers' own "Resuming ...
global step N") and ends with LoRA weights bit-identical to the reference.

    python bench/llamafactory/run.py --json bench/results/llamafactory.json
    python bench/llamafactory/run.py --only uninstrumented   # no bootstrap needed

Exit status 0 only if every checked fact holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.llamafactory import scenarios
from bench.llamafactory.checks import Fact, judge_instrumented, judge_uninstrumented
from bench.llamafactory.daemon import PrivateDaemon
from bench.llamafactory.workdir import Recipe, Workdir

HERE = Path(__file__).resolve().parent


def ensure_venv() -> tuple[Path, dict[str, Any]]:
    """Run setup_venv.sh (a no-op when its stamp matches); time it."""
    start = time.monotonic()
    done = subprocess.run(["bash", str(HERE / "setup_venv.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"setup_venv.sh exited {done.returncode}:\n{done.stderr[-3000:]}")
    venv = Path(done.stdout.strip().splitlines()[-1])
    versions = json.loads((venv / "ftsup-lf-versions.json").read_text())
    return venv, {"path": str(venv), "setup_s": round(time.monotonic() - start, 1), **versions}


def print_table(facts: list[Fact]) -> None:
    width = max(len(f.what) for f in facts)
    for run in dict.fromkeys(f.run for f in facts):
        print(f"\n{run}")
        for fact in (f for f in facts if f.run == run):
            mark = "ok  " if fact.ok else ("FAIL" if fact.ok is False else "    ")
            print(f"  {mark} {fact.what:<{width}}  {fact.value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every observation and fact here")
    parser.add_argument("--only", choices=["instrumented", "uninstrumented"])
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    t0 = time.monotonic()
    venv, venv_info = ensure_venv()
    recipe = Recipe()
    root = Path(tempfile.mkdtemp(prefix="ftsup-lf", dir="/tmp"))  # short: socket paths
    work = Workdir(root, recipe).build()
    daemon = PrivateDaemon(root)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "venv": venv_info,
        "recipe": recipe.__dict__,
    }
    facts: list[Fact] = []
    try:
        daemon.start()
        reference, reference_out = scenarios.run_reference(work, venv)
        runs: dict[str, scenarios.Seen] = {}
        if args.only in (None, "instrumented"):
            runs["instrumented"] = scenarios.instrumented(daemon, work, venv, save_at=3, stop_at=13)
        if args.only in (None, "uninstrumented"):
            runs["uninstrumented"] = scenarios.uninstrumented(
                daemon, work, venv, kill_at=13, stop_at=23
            )
        code = reference.wait(600)
        if code != 0:
            raise RuntimeError(f"the reference run exited {code}: see {root}/reference/lf.log")
        results["reference"] = json.loads((reference_out / "all_results.json").read_text())
        for name, seen in runs.items():
            out = work.output_dir(seen.job)
            seen.same_as_reference = scenarios.compare_adapters(out, reference_out)
            judge = judge_instrumented if name == "instrumented" else judge_uninstrumented
            facts += judge(seen, recipe, name)
            results[name] = seen.__dict__
    except BaseException:
        print(f"--- daemon log ---\n{daemon.daemon_log()[-4000:]}", file=sys.stderr)
        print(f"work folder kept: {root}", file=sys.stderr)
        args.keep = True
        raise
    finally:
        daemon.cleanup()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["facts"] = [f.__dict__ for f in facts]
    print(
        f"LLaMA-Factory {venv_info['llamafactory']} (transformers {venv_info['transformers']}, "
        f"peft {venv_info['peft']}, torch {venv_info['torch']}); "
        f"venv setup {venv_info['setup_s']} s"
    )
    print_table(facts)
    print(f"\ntotal wall time {results['wall_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0 if all(f.ok is not False for f in facts) else 1


if __name__ == "__main__":
    sys.exit(main())
