"""What the daemon itself costs with a full server, and whether it sleeps when idle.

A real daemon (simulated GPUs, FTSUP_SIMULATE_GPUS=8) in temporary folders:

1. idle: no job at all, `--idle` seconds: wake-ups of its event loop (voluntary +
   involuntary context switches of the main thread, /proc/PID/status; the GPU
   monitor's own threads counted apart) and CPU (utime+stime, /proc/PID/stat);
2. load: 8 running `[command]` jobs (`[gpu] count = 1`), each writing `--rate`
   progress lines/s to FTSUP_PROGRESS_FILE, and 100 queued behind them;
   `--seconds` of CPU and RSS (VmRSS, peak VmHWM) with no client attached;
3. status: the same load while a client asks `status` (every job, what `ftsup
   status` shows) and `status <job>` back to back through
   `ftsup.supervisor.client.Client`, `--requests` of each: p50/p99/max.

    python bench/daemon_load.py [--seconds 30] [--idle 20] [--requests 300] [--json FILE]
                                [--profile FILE]  # the daemon under cProfile (pstats file)

The issue's targets: load at most 5% of a core and 80 MB, status p99 under
50 ms, idle no wake-up more often than once a second. The trainers' own CPU is
not counted (they are other processes), but on a small machine they compete
with the daemon for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ftsup.supervisor.client import Client, DaemonUnavailable
from ftsup.supervisor.contract import ENV_PROGRESS_FILE, ENV_SIMULATE_GPUS
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.procinfo import is_same_process

RUNNING = 8
QUEUED = 100
TICKS = os.sysconf("SC_CLK_TCK")


# the trainer -----------------------------------------------------------------
def writer(rate: float) -> int:
    """A trainer that only writes progress lines, `rate` a second, until killed."""
    path = os.environ[ENV_PROGRESS_FILE]
    step, period = 0, 1.0 / rate
    next_at = time.monotonic()
    with open(path, "a") as out:
        out.write(json.dumps({"ts": time.time(), "event": "train_start", "step": 0}) + "\n")
        out.flush()
        while True:
            step += 1
            line = {"ts": time.time(), "event": "step", "step": step, "max_steps": 10**9}
            out.write(json.dumps({**line, "loss": 1.0 + 1.0 / step}) + "\n")
            out.flush()
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))


# the daemon's numbers ---------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def status_fields(path: str) -> dict[str, int]:
    found = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            found[key] = int(value.split()[0])
    return found


def switches(pid: int) -> tuple[int, int]:
    """(main thread's, other threads') context switches: each one a wake-up."""
    main, others = 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = status_fields(str(task / "status"))
        except OSError:
            continue  # a thread that just ended
        count = fields["voluntary_ctxt_switches"] + fields["nonvoluntary_ctxt_switches"]
        if task.name == str(pid):
            main += count
        else:
            others += count
    return main, others


def memory_mb(pid: int) -> tuple[float, float]:
    fields = status_fields(f"/proc/{pid}/status")
    return fields["VmRSS"] / 1024, fields["VmHWM"] / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# the bench -------------------------------------------------------------------
class Bench:
    def __init__(self, rate: float, profile: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ftsup-load", dir="/tmp"))
        self.layout = Layout(self.root / "state", self.root / "rt")
        self.rate = rate
        self.env = {
            **os.environ,
            "FTSUP_STATE_DIR": str(self.layout.state_dir),
            "FTSUP_RUNTIME_DIR": str(self.layout.runtime_dir),
            ENV_SIMULATE_GPUS: str(RUNNING),
        }
        self.daemon: subprocess.Popen[bytes] | None = None
        self.profile = profile

    def start_daemon(self) -> int:
        self.layout.state_dir.mkdir(parents=True)
        log = (self.root / "daemon.log").open("ab")
        profiled = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        self.daemon = subprocess.Popen(
            [sys.executable, *profiled, "-m", "ftsup.supervisor", "daemon"],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(DaemonUnavailable), self.client() as client:
                client.request("ping")
                return self.daemon.pid
            time.sleep(0.1)
        raise RuntimeError(f"the daemon did not answer; see {self.root / 'daemon.log'}")

    def client(self) -> Client:
        return Client(self.layout.socket, timeout=60)

    def submit(self, client: Client, name: str) -> None:
        output = self.root / "out" / name
        argv = [sys.executable, str(Path(__file__).resolve()), "--writer", str(self.rate)]
        text = (
            f'[job]\nname = "{name}"\noutput_dir = "{output}"\n\n'
            f"[command]\nargv = {json.dumps(argv)}\n\n[gpu]\ncount = 1\n"
        )
        spec = self.root / f"{name}.toml"
        spec.write_text(text)
        client.request("start", spec_path=str(spec), spec_text=text)

    def wait_running(self, client: Client, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = client.request("status")["counts"]
            if counts.get("running", 0) >= count:
                return
            time.sleep(0.5)
        raise RuntimeError(f"fewer than {count} jobs running after {timeout:.0f}s: {counts}")

    def cleanup(self) -> None:
        """The daemon, then every shim and trainer it started (by process group)."""
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(60)
            except subprocess.TimeoutExpired:
                print("the daemon did not stop within 60 s: killed", file=sys.stderr)
                self.daemon.kill()
                self.daemon.wait(10)
        for pids_file in self.layout.state_dir.glob("runs/*/attempt-*/pids.json"):
            pids = json.loads(pids_file.read_text())
            if is_same_process(pids["shim_pid"], pids["shim_start"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids["shim_pid"], signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError, KeyError):
                os.killpg(pids["pgid"], signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def measure_idle(pid: int, seconds: float) -> dict[str, float]:
    cpu0, (main0, others0) = cpu_seconds(pid), switches(pid)
    time.sleep(seconds)
    cpu1, (main1, others1) = cpu_seconds(pid), switches(pid)
    return {
        "seconds": seconds,
        "loop_wakeups_per_s": (main1 - main0) / seconds,
        "thread_wakeups_per_s": (others1 - others0) / seconds,
        "cpu_percent": 100 * (cpu1 - cpu0) / seconds,
    }


def measure_load(pid: int, seconds: float) -> dict[str, float]:
    cpu0, (main0, _) = cpu_seconds(pid), switches(pid)
    started = time.monotonic()
    rss = []
    while time.monotonic() - started < seconds:
        time.sleep(1.0)
        rss.append(memory_mb(pid)[0])
    elapsed = time.monotonic() - started
    cpu1, (main1, _) = cpu_seconds(pid), switches(pid)
    return {
        "seconds": elapsed,
        "cpu_percent": 100 * (cpu1 - cpu0) / elapsed,
        "loop_wakeups_per_s": (main1 - main0) / elapsed,
        "rss_mb": statistics.mean(rss),
        "peak_rss_mb": memory_mb(pid)[1],
    }


def measure_status(bench: Bench, pid: int, requests: int) -> dict[str, float]:
    every: list[float] = []
    one: list[float] = []
    cpu0, started = cpu_seconds(pid), time.monotonic()
    with bench.client() as client:
        for i in range(requests):
            for args, into in (({}, every), ({"job": "run-0"}, one)):
                t0 = time.perf_counter()
                client.request("status", **args)
                into.append(1000 * (time.perf_counter() - t0))
            if i % 10 == 9:
                time.sleep(0.05)  # a client that also lets the loop breathe, like a TUI
    elapsed = time.monotonic() - started
    return {
        "requests": float(requests),
        "all_p50_ms": statistics.median(every),
        "all_p99_ms": percentile(every, 0.99),
        "all_max_ms": max(every),
        "one_p50_ms": statistics.median(one),
        "one_p99_ms": percentile(one, 0.99),
        "one_max_ms": max(one),
        "cpu_percent_while_asked": 100 * (cpu_seconds(pid) - cpu0) / elapsed,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args.rate, args.profile)
    try:
        pid = bench.start_daemon()
        time.sleep(2.0)  # start-up work done
        idle = measure_idle(pid, args.idle)
        with bench.client() as client:
            for i in range(RUNNING):
                bench.submit(client, f"run-{i}")
            bench.wait_running(client, RUNNING)
            for i in range(QUEUED):
                bench.submit(client, f"wait-{i:03d}")
            counts = client.request("status")["counts"]
        time.sleep(3.0)  # submissions settled
        load = measure_load(pid, args.seconds)
        status = measure_status(bench, pid, args.requests)
        return {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "rate_lines_per_s": args.rate,
            "counts": counts,
            "idle": idle,
            "load": load,
            "status": status,
        }
    finally:
        bench.cleanup()


def table(result: dict[str, Any]) -> str:
    idle, load, status = result["idle"], result["load"], result["status"]
    rows = [
        ("idle: loop wake-ups/s", f"{idle['loop_wakeups_per_s']:.1f}", "<= 1"),
        ("idle: other threads' wake-ups/s", f"{idle['thread_wakeups_per_s']:.1f}", "(GPU monitor)"),
        ("idle: CPU % of a core", f"{idle['cpu_percent']:.2f}", ""),
        ("load: CPU % of a core", f"{load['cpu_percent']:.2f}", "<= 5"),
        ("load: loop wake-ups/s", f"{load['loop_wakeups_per_s']:.0f}", ""),
        ("load: RSS MB (peak)", f"{load['rss_mb']:.1f} ({load['peak_rss_mb']:.1f})", "<= 80"),
        (
            "status, all jobs: p50/p99/max ms",
            f"{status['all_p50_ms']:.1f} / {status['all_p99_ms']:.1f} / {status['all_max_ms']:.1f}",
            "p99 < 50",
        ),
        (
            "status <job>: p50/p99/max ms",
            f"{status['one_p50_ms']:.1f} / {status['one_p99_ms']:.1f} / {status['one_max_ms']:.1f}",
            "p99 < 50",
        ),
        ("CPU % while asked", f"{status['cpu_percent_while_asked']:.1f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{RUNNING} running x {result['rate_lines_per_s']:g} lines/s, {QUEUED} queued; "
        f"{result['machine']['cpus']} CPUs; counts {result['counts']}"
    ]
    lines += [f"{name:<{width}}  {value:>22}  {target}" for name, value, target in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="the load window")
    parser.add_argument("--idle", type=float, default=20.0, help="the idle window")
    parser.add_argument("--requests", type=int, default=300, help="status requests of each kind")
    parser.add_argument("--rate", type=float, default=20.0, help="progress lines/s per job")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument(
        "--profile", type=Path, default=None, help="run the daemon under cProfile, stats here"
    )
    parser.add_argument("--writer", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer is not None:
        return writer(args.writer)
    result = run(args)
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
