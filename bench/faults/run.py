"""Fault suite (issue 12): faults of the environment against a real ftsup daemon.

Each category (one module here) starts a real daemon in temporary folders, drives
it through the real CLI or socket, injects its fault many times (seeded) and
judges every case: ok, clear error, crash or data lost (see outcomes.py and
docs/reliability.md). The table counts them per category, plus the valid
checkpoints that were quarantined. Exit 0 only when there is no crash, no data
lost, no valid checkpoint quarantined and no category failed to run.

    python bench/faults/run.py [--quick] [--seed N] [--json OUT] [--only a,b]

Needs root (tmpfs mounts, uid 65534). Everything started is killed at the end by
process group, every mount is unmounted, also on errors and on SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench.faults` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults import (
    daemon_kill,
    database,
    descriptors,
    disk_full,
    frames,
    jobfiles,
    other_uid,
    shim_kill,
)
from bench.faults.outcomes import Category, Config
from bench.faults.procs import REAPER, rmtree
from bench.faults.toyrun import REPO

CATEGORIES: dict[str, tuple[str, Callable[[Config, Category], None]]] = {
    "jobfiles": ("bad job files", jobfiles.run),
    "frames": ("fuzzed frames", frames.run),
    "daemon_kill": ("daemon SIGKILLs", daemon_kill.run),
    "shim_kill": ("shim SIGKILLs", shim_kill.run),
    "disk_full": ("full state disk", disk_full.run),
    "descriptors": ("descriptor exhaustion", descriptors.run),
    "database": ("damaged databases", database.run),
    "other_uid": ("other-uid access", other_uid.run),
}
COLUMNS = ("tried", "ok", "clear error", "crash", "data lost", "quarantined_valid")


def table(results: dict[str, Category]) -> str:
    rows = [
        "| category | tried | ok | clear error | crash | data lost | valid ckpts quarantined |",
        "|---|---|---|---|---|---|---|",
    ]
    total = dict.fromkeys(COLUMNS, 0)
    for key, cat in results.items():
        counts = cat.counts()
        for col in COLUMNS:
            total[col] += counts[col]
        note = " (bench error)" if cat.error else ""
        rows.append(
            f"| {CATEGORIES[key][0]}{note} | " + " | ".join(str(counts[c]) for c in COLUMNS) + " |"
        )
    rows.append("| **total** | " + " | ".join(f"**{total[c]}**" for c in COLUMNS) + " |")
    return "\n".join(rows)


def git_revision() -> str:
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return res.stdout.strip()

    dirty = " plus uncommitted changes" if git("status", "--porcelain", "-uno") else ""
    return git("rev-parse", "HEAD") + dirty


def ftsup_location() -> str:
    """Where the daemons of this run import ftsup from."""
    code = "import ftsup.supervisor as s, pathlib; print(pathlib.Path(s.__file__).parent)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return res.stdout.strip() or res.stderr.strip()[-200:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few cases per category (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the cases and counts here")
    parser.add_argument("--only", help=f"comma-separated categories of {','.join(CATEGORIES)}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(CATEGORIES)
    unknown = [c for c in chosen if c not in CATEGORIES]
    if unknown:
        parser.error(f"unknown categories {unknown}; choose from {','.join(CATEGORIES)}")
    if os.geteuid() != 0:
        print("warning: not root; tmpfs and other-uid cases will fail", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(tempfile.mkdtemp(prefix="ftf", dir="/tmp"))  # short: socket path limit
    os.chmod(root, 0o755)  # ftsup's own permissions must protect its files, not ours
    REAPER.root = root
    results: dict[str, Category] = {}
    started = time.time()
    revision = git_revision()  # at the start: others may commit while it runs
    try:
        for key in chosen:
            cat = results[key] = Category(CATEGORIES[key][0])
            print(f"== {cat.name}", flush=True)
            began = time.monotonic()
            try:
                CATEGORIES[key][1](Config(args.quick, args.seed, root / key), cat)
            except Exception:  # the bench broke, not necessarily ftsup: say so, go on
                cat.error = traceback.format_exc()
                print(cat.error, file=sys.stderr, flush=True)
            finally:
                REAPER.kill_all()
            cat.seconds = time.monotonic() - began
    finally:
        REAPER.kill_all()
        if not args.keep:
            rmtree(root)
    print(table(results))
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": revision,
        "ftsup_from": ftsup_location(),  # PYTHONPATH can point at another checkout
        "quick": args.quick,
        "seed": args.seed,
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "categories": {k: c.to_json() for k, c in results.items()},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    bad = any(
        c.error or c.counts()["crash"] or c.counts()["data lost"] or c.counts()["quarantined_valid"]
        for c in results.values()
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
