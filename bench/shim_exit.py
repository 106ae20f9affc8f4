"""How long the daemon waits for a shim after its trainer is killed.

The daemon restarts a job once the attempt's shim has ended (a pidfd in its
event loop), so the time from the trainer's death to the shim's is on every
restart's path. This runs the real shim (`python -m ftsup.supervisor.shim`)
over a trainer that only sleeps, SIGKILLs the trainer once the shim has
written `pids.json`, and times until the shim's pidfd is readable.

    python bench/shim_exit.py [--runs 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ftsup.supervisor.contract import PIDS_FILE


def one_run(folder: Path) -> float:
    """Seconds from the trainer's SIGKILL to the shim's end."""
    attempt, out = folder / "attempt-1", folder / "out"
    attempt.mkdir()
    out.mkdir()
    trainer = [sys.executable, "-c", "import time; time.sleep(600)"]
    shim = subprocess.Popen(
        [sys.executable, "-m", "ftsup.supervisor.shim", "--attempt-dir", str(attempt),
         "--output-dir", str(out), "--job", "bench", "--attempt", "1", "--grace", "5",
         "--", *trainer],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        pids = attempt / PIDS_FILE
        deadline = time.monotonic() + 60
        while not pids.exists():
            if time.monotonic() > deadline or shim.poll() is not None:
                raise RuntimeError("the shim did not start its trainer")
            time.sleep(0.01)
        time.sleep(0.3)  # the shim is waiting in its select, as during training
        trainer_pid = json.loads(pids.read_text())["trainer_pid"]
        pidfd = os.pidfd_open(shim.pid)
        started = time.perf_counter()
        os.kill(trainer_pid, signal.SIGKILL)
        select.select([pidfd], [], [])
        elapsed = time.perf_counter() - started
        os.close(pidfd)
        return elapsed
    finally:
        if shim.poll() is None:
            os.killpg(shim.pid, signal.SIGKILL)
        shim.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    times = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ftsup-shim-exit-") as folder:
            times.append(one_run(Path(folder)) * 1000)
    result = {
        "runs": args.runs,
        "median_ms": round(statistics.median(times), 1),
        "all_ms": [round(t, 1) for t in times],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"trainer SIGKILL -> shim gone: median {result['median_ms']} ms over {args.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
