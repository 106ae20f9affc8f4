"""How long the kernel takes to end a SIGKILLed process, by what it had loaded.

A restart cannot begin before the killed trainer has ended: the shim's pidfd
(and the daemon's, through the shim) becomes readable only after the kernel
has torn down the process's address space, and the output-folder lock is
released only then. This times SIGKILL to a readable pidfd for a bare Python,
for Python with torch, with torch + transformers + peft (a trainer's imports),
and with 200 MB of anonymous memory, so that the part of a takeover no
supervisor can shorten is known (docs/benchmarks.md, "Where a takeover's time
goes").

    python bench/kill_teardown.py [--runs 7] [--json]
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
import time

READY = "print('ready', flush=True); import time; time.sleep(600)"
VARIANTS = {
    "python": READY,
    "torch": f"import torch; {READY}",
    "torch+transformers+peft": f"import torch, transformers, peft; {READY}",
    "200 MB anonymous": f"b = bytearray(200_000_000); {READY}",
}


def one_run(code: str) -> float:
    """Seconds from SIGKILL to the pidfd of a process that ran `code`."""
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        pidfd = os.pidfd_open(process.pid)
        try:
            started = time.perf_counter()
            os.kill(process.pid, signal.SIGKILL)
            select.select([pidfd], [], [])
            return time.perf_counter() - started
        finally:
            os.close(pidfd)
    finally:
        process.kill()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    for name, code in VARIANTS.items():
        times = [one_run(code) for _ in range(args.runs)]
        results[name] = {
            "median_ms": round(statistics.median(times) * 1000, 1),
            "min_ms": round(min(times) * 1000, 1),
            "max_ms": round(max(times) * 1000, 1),
        }
    if args.json:
        print(json.dumps({"runs": args.runs, "results": results}, indent=1))
    else:
        print("| process | SIGKILL to pidfd, median (min-max) ms |\n|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['median_ms']} ({r['min_ms']}-{r['max_ms']}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
