"""Chaos benchmark (issue 8): the same small job, SIGKILLed at random moments, two ways.

Modes, all in one invocation, on the same LoRA job (`prepare_demo`: tiny
offline Llama model, arithmetic data):

* `ftsup`: the built-in trainer under a daemon in temporary folders, job
  defaults; the trainer's process group is SIGKILLed and the daemon restarts
  it (its warm standby takes over when one is ready; the memory tier, on by
  default for LoRA since issue 18, gives it the newest snapshot in RAM when
  that is newer than the newest disk checkpoint).
  The daemon is started first and the job submitted once its spare standby
  (daemon.toml `[standby] spares`, default 1) is warm, as to a daemon that
  runs as a service: the first attempt, and a restart that comes before the
  job's own standby is warm, take over the spare.
* `ftsup_nospare`: `ftsup` with `[standby] spares = 0` in daemon.toml (what
  `ftsup` was before): the first attempt starts cold.
* `ftsup_cold`: the same with `[restart] standby = false`: every restart is a
  cold start of the trainer (a job without standbys takes no spare either).
* `ftsup_2standby`: `ftsup` with `[restart] standby_count = 2`: a kill that
  comes before the next standby has warmed up finds the second one ready.
* `ftsup@0.05` (any mode of the daemon, any number): that mode with
  `[checkpoint] memory_overhead = 0.05`, so that two budgets meet the same
  kills in one invocation (`--memory-overhead` sets it for every such mode).
* `ftsup_diskmem`: `ftsup` with `[checkpoint] memory_dir` in the benchmark's
  folder on the disk (/tmp here), where an on-demand daemon's runtime folder
  kept the snapshots before they moved to /dev/shm.
* `ftsup_disk`: `ftsup` with the memory tier off (`[checkpoint] memory_every
  = 0`): restarts resume disk checkpoints only, as before issue 18.
* `baseline`: plain transformers Trainer (`hf_train.py`) under a restart loop
  that does what `while ! python hf_train.py --resume_from_checkpoint
  <newest checkpoint-* by number>; do :; done` does: restart at once.
* `baseline_guarded`: the same loop, but it passes the newest checkpoint that
  holds `trainer_state.json` (a naive loop resumes a half-written checkpoint
  after a kill during a save, and HF then fails on every restart).
* `daemon_kill`: the ftsup job again, but the *daemon* is SIGKILLed and
  restarted while the trainer keeps running.

Kills are triggered from the progress file (seeded RNG): "random" kills at a
random step plus a random fraction of a step; "save" kills the moment the
step that saves a checkpoint is reported, i.e. while that save runs. Whether
a save kill really landed before the save was reported complete is recorded.

Everything is measured from the progress lines (`ts`, `event`, `step`) with
one function for all modes; `ftsup`'s own goodput (from `ftsup status
--json`) is reported next to it. Everything started is killed at the end, by
process group, also on errors.

    python bench/chaos/run.py --out bench/results/chaos.json [--quick]   # ~15 min / ~7 min
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HF_SCRIPT = HERE / "hf_train.py"
JOB = "chaos"
BACKOFF = "0.5s"


# ----------------------------------------------------------------- processes


class Reaper:
    """Remembers every process group this benchmark started and kills them all at the end.

    Daemons first (so that none starts another attempt meanwhile), then the
    shims and trainers their `pids.json` files name, then anything still
    running whose command line names this invocation's temporary folder (a
    shim started just before its daemon died, before its `pids.json`).
    """

    def __init__(self) -> None:
        self.pgids: set[int] = set()
        self.state_dirs: list[Path] = []
        self.memory_dirs: list[Path] = []  # the daemons' folders in /dev/shm
        self.root: Path | None = None

    def add(self, pgid: int) -> None:
        self.pgids.add(pgid)

    def kill_all(self) -> None:
        self._kill(self.pgids)
        time.sleep(0.2)  # a daemon killed mid-spawn has finished dying
        for state in self.state_dirs:
            for pids_file in state.glob("runs/*/attempt-*/pids.json"):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    pids = json.loads(pids_file.read_text())
                    self._kill({int(pids["pgid"]), int(pids["shim_pid"])})
        if self.root is not None:
            self._kill(set(self._pids_naming(str(self.root))))
        self.pgids.clear()
        for folder in self.memory_dirs:
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _kill(pgids: set[int]) -> None:
        mine = os.getpgid(0)
        for pgid in pgids:
            if pgid != mine:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)

    @staticmethod
    def _pids_naming(text: str) -> list[int]:
        """Process groups of processes whose command line contains `text`."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if text.encode() in (proc / "cmdline").read_bytes():
                        found.append(os.getpgid(int(proc.name)))
        return found


REAPER = Reaper()


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session (so its whole group can be killed), output to `log`."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True)
    REAPER.add(proc.pid)
    return proc


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ------------------------------------------------------------------ progress


class Tail:
    """Reads new complete lines of a JSONL file as they are appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._pos = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self._pos += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            with contextlib.suppress(ValueError):
                new.append(json.loads(line))
        self.records += new
        return new


@dataclass
class Kill:
    """One planned kill: after `step` is reported (+ `delay_s`); `save`: at a saving step."""

    step: int
    delay_s: float
    save: bool
    ts: float | None = None
    landed_in_save: bool | None = None


@dataclass
class ModeResult:
    mode: str
    launched: float
    kills: list[Kill] = field(default_factory=list)
    completed: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    ended: float = 0.0  # when the mode finished or gave up
    kills_trainer: bool = True  # False: the daemon is killed, the trainer's attempt goes on
    launches: list[float] = field(default_factory=list)  # when each trainer process started


def plan_kills(rng: random.Random, steps: int, save_steps: int, n: int) -> list[Kill]:
    """`n` kills spread over 10-90% of the run; every second one at a saving step.

    The others avoid a saving step and the step before it, so that only the
    save kills are meant to land in a save (under load one still may: each
    kill records where it landed).
    """
    kills = []
    lo, hi = int(steps * 0.1), int(steps * 0.9)
    width = (hi - lo) / n
    for i in range(n):
        step = rng.randint(int(lo + i * width) + 1, int(lo + (i + 1) * width))
        save = i % 2 == 1
        if save:  # the next saving step that is not the last one
            step = min(-(-step // save_steps) * save_steps, (steps - 1) // save_steps * save_steps)
        else:
            while save_steps > 2 and (step % save_steps) in (0, save_steps - 1):
                step -= 1
        kills.append(Kill(step=step, delay_s=0.0 if save else rng.uniform(0, 0.05), save=save))
    # Strictly increasing, so each kill needs new ground after the previous one.
    for a, b in itertools.pairwise(kills):
        b.step = max(b.step, a.step + 1)
    return kills


def drive_kills(
    tail: Tail,
    kills: list[Kill],
    kill: Any,
    done: Any,
    deadline: float,
    save_steps: int,
) -> None:
    """Watch progress; fire each kill when its step is reported by a live attempt.

    A kill landed in a save when the newest step reported before it is a saving
    step whose `checkpoint_saved` had not been reported yet.
    """
    pending = list(kills)
    last_kill_ts = 0.0
    while time.time() < deadline and not done():
        for rec in tail.poll():
            if not pending or rec.get("event") != "step" or rec["ts"] < last_kill_ts:
                continue
            k = pending[0]
            if int(rec["step"]) >= k.step:
                if k.delay_s:
                    time.sleep(k.delay_s)
                tail.poll()  # lines written in the meantime count
                k.ts = time.time()
                kill()
                live = [r for r in tail.records if r["ts"] >= last_kill_ts]
                newest = max(int(r["step"]) for r in live if r.get("event") == "step")
                saved = {int(r["step"]) for r in live if r.get("event") == "checkpoint_saved"}
                k.landed_in_save = newest % save_steps == 0 and newest not in saved
                last_kill_ts = k.ts
                pending.pop(0)
                break  # lines after the kill belong to the dead attempt: drop the batch
        time.sleep(0.01)


# ------------------------------------------------------------------- metrics


def _stall(saved: dict[str, Any]) -> float:
    """How long a save blocked training: `stall_s` when the trainer reports it (an
    asynchronous save blocks for less than it lasts), else its whole duration."""
    value = saved.get("stall_s")
    if value is None:
        value = saved.get("seconds")
    return float(value or 0.0)


def measure(result: ModeResult, max_steps: int) -> dict[str, Any]:
    """Wall, goodput, kill-to-next-step and steps lost, the same way for every mode.

    Attempts are cut at the kill times. Within an attempt, the interval between
    two consecutive steps is productive when the later step is new ground (above
    every step reached before the attempt), minus the stall of any checkpoint
    reported saved in it; intervals of re-executed steps are recomputation;
    everything else (start-up, restart, lost work) is downtime.

    The memory tier's snapshots (issue 18) stall the step they follow; that time
    lies inside the step intervals and counts as productive in `goodput`, as in
    the tables before the tier. `goodput_snapshots_as_stall` counts it as stall,
    as the daemon's own goodput does.
    """
    cuts = sorted(k.ts for k in result.kills if k.ts is not None)
    attempt_cuts = cuts if result.kills_trainer else []
    steps = [r for r in result.records if r.get("event") == "step"]
    saves = [r for r in result.records if r.get("event") == "checkpoint_saved"]
    snapshots = [r for r in result.records if r.get("event") == "memory_snapshot"]
    final = [r["ts"] for r in steps if r["step"] >= max_steps]
    end = final[0] if final else result.ended  # incomplete: until it gave up
    wall = end - result.launched
    productive = recomputed = stall = snapshot_stall = 0.0
    high, high_before, attempt, prev = 0, 0, -1, None
    redone = 0
    for r in steps:
        a = sum(1 for c in attempt_cuts if c <= r["ts"])
        if a != attempt:
            attempt, prev, high_before = a, None, high
        if prev is not None:
            interval = r["ts"] - prev["ts"]
            s = sum(_stall(x) for x in saves if prev["ts"] < x["ts"] <= r["ts"])
            s = min(s, interval)
            if r["step"] <= high_before:
                recomputed += interval - s
            else:
                productive += interval - s
                snapshot_stall += sum(
                    float(x.get("stall_s") or 0)
                    for x in snapshots
                    if prev["ts"] <= x["ts"] < r["ts"]  # snapshot N follows step N
                )
            stall += s
        if r["step"] <= high_before:
            redone += 1
        high = max(high, r["step"])
        prev = r
    to_step = []
    parts: dict[str, list[float]] = {"restart": [], "startup": [], "first_step": []}
    starts = [r["ts"] for r in result.records if r.get("event") == "train_start"]
    for c in cuts:
        after = [r["ts"] for r in steps if r["ts"] > c]
        if not after:
            continue
        to_step.append(after[0] - c)
        launch = next((t for t in result.launches if t > c), None)
        begin = next((t for t in starts if t > c), None)
        if result.kills_trainer and launch is not None and begin is not None:
            parts["restart"].append(launch - c)  # detection + backoff until a new process
            parts["startup"].append(begin - launch)  # Python, imports, data, model, checkpoint
            parts["first_step"].append(after[0] - begin)
    return {
        "completed": result.completed,
        "kills": len(cuts),
        "kills_in_save": sum(1 for k in result.kills if k.landed_in_save),
        "wall_s": round(wall, 2),
        "goodput": round(productive / wall, 3) if wall > 0 else None,
        # The same without the first start-up (identical work in every mode):
        # what the kills alone cost.
        "goodput_after_first_step": round(productive / (end - steps[0]["ts"]), 3)
        if steps and end > steps[0]["ts"]
        else None,
        "goodput_snapshots_as_stall": round((productive - snapshot_stall) / wall, 3)
        if wall > 0
        else None,
        "snapshot_stall_s": round(snapshot_stall, 2),
        "first_step_s": round(steps[0]["ts"] - result.launched, 2) if steps else None,
        "productive_s": round(productive, 2),
        "checkpoint_stall_s": round(stall, 2),
        "recomputed_s": round(recomputed, 2),
        "downtime_s": round(wall - productive - stall - recomputed, 2),
        "kill_to_step_mean_s": round(statistics.mean(to_step), 2) if to_step else None,
        "kill_to_step_median_s": round(statistics.median(to_step), 2) if to_step else None,
        "kill_to_step_worst_s": round(max(to_step), 2) if to_step else None,
        "kill_to_step_s": [round(t, 2) for t in to_step],
        "steps_lost": redone,
        # Medians of kill-to-step, split: kill -> new process -> train_start -> step.
        "kill_to_step_parts_s": {k: round(statistics.median(v), 2) for k, v in parts.items() if v},
        "kill_plan": [
            {"step": k.step, "save": k.save, "landed_in_save": k.landed_in_save}
            for k in result.kills
        ],
    }


# --------------------------------------------------------------------- ftsup


class Daemon:
    """An ftsup daemon in its own temporary state and runtime folders."""

    def __init__(self, root: Path, env: dict[str, str], *, spares: int = 1) -> None:
        from ftsup.supervisor.memory_tier import shm_folder

        self.state = root / "s"
        self.env = {
            **env,
            "FTSUP_STATE_DIR": str(self.state),
            "FTSUP_RUNTIME_DIR": str(root / "r"),
        }
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "daemon.toml").write_text(f"[standby]\nspares = {spares}\n")
        REAPER.state_dirs.append(self.state)
        REAPER.memory_dirs.append(shm_folder(root / "r"))  # its snapshots, in /dev/shm
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "ftsup.supervisor", "daemon"]
        self.proc = spawn(argv, self.env, self.state / "daemon.out")
        deadline = time.time() + 60
        while self.cli("ls", check=False).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError(f"daemon did not answer; see {self.state / 'daemon.out'}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the daemon alone (shims and trainers live in their own sessions)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "ftsup.supervisor", *args]
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"ftsup {' '.join(args)}: {result.stdout}{result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", JOB, "--json").stdout))

    def wait_for_spare(self, timeout: float = 120) -> float:
        """Seconds until the daemon's spare standby is warm (0 when it keeps none)."""
        began = time.time()
        while time.time() < began + timeout:
            spares = json.loads(self.cli("status", "--json").stdout)["spares"]
            if not spares["kept"] or (spares["next"] or {}).get("state") == "ready":
                return time.time() - began
            time.sleep(0.2)
        raise RuntimeError(f"no spare standby warm after {timeout:.0f}s")

    def kill_trainer(self) -> None:
        """SIGKILL the newest attempt's trainer process group (what `ftsup signal KILL` does)."""
        runs = self.state / "runs" / JOB
        newest = max(runs.glob("attempt-*"), key=lambda p: int(p.name.split("-")[1]))
        pgid = int(json.loads((newest / "pids.json").read_text())["pgid"])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def write_job(
    work: Path,
    steps: int,
    save_steps: int,
    kills: int,
    *,
    standby: int,
    memory: int | None = None,
    memory_overhead: float | None = None,
    memory_dir: Path | None = None,
) -> Path:
    """The demo job, with a short backoff and enough restarts for the benchmark."""
    from ftsup.trainer.demo import prepare_demo

    job = prepare_demo(work, steps=steps, name=JOB)
    text = job.read_text().split("\n[restart]")[0]
    text = re.sub(r"(?m)^save_steps = \d+$", f"save_steps = {save_steps}", text)
    tier = ""
    if memory is not None:  # None: the job's default (`auto`)
        tier += f"memory_every = {memory}\n"
    if memory_overhead is not None:  # None: the trainer's default budget
        tier += f"memory_overhead = {memory_overhead}\n"
    if memory_dir is not None:  # None: the daemon's (in RAM)
        tier += f'memory_dir = "{memory_dir}"\n'
    if tier:
        text = text.replace("\n[checkpoint]\n", f"\n[checkpoint]\n{tier}", 1)
        if tier not in text:
            text += f"\n[checkpoint]\n{tier}"
    restart = (
        f'\n[restart]\nbackoff = "{BACKOFF}"\nbackoff_max = "1s"\n'
        f"max_restarts = {kills + 5}\ncrash_loop = {kills + 5}\n"
        f"standby = {'true' if standby else 'false'}\n"
        + (f"standby_count = {standby}\n" if standby > 1 else "")
    )
    job.write_text(text + restart)
    return job


def run_ftsup(
    root: Path,
    env: dict[str, str],
    steps: int,
    save_steps: int,
    kills: list[Kill],
    timeout: float,
    mode: str,
    memory_overhead: float | None = None,
) -> ModeResult:
    """Built-in trainer under the daemon; trainer kills (`ftsup`) or daemon kills."""
    job = write_job(
        root / "w",
        steps,
        save_steps,
        len(kills),
        standby={"ftsup_cold": 0, "ftsup_2standby": 2}.get(mode, 1),
        memory=0 if mode == "ftsup_disk" else None,
        memory_overhead=memory_overhead,
        memory_dir=root / "diskmem" if mode == "ftsup_diskmem" else None,
    )
    daemon = Daemon(root, env, spares=0 if mode == "ftsup_nospare" else 1)
    daemon.start()
    spare_wait = daemon.wait_for_spare()  # a service's daemon has long been up
    result = ModeResult(mode=mode, launched=time.time(), kills=kills)
    result.extra["spare_wait_s"] = round(spare_wait, 2)
    result.kills_trainer = mode != "daemon_kill"
    daemon.cli("start", str(job))
    tail = Tail(daemon.state / "runs" / JOB / "progress.jsonl")

    def finished() -> bool:
        return any(r.get("event") == "train_end" for r in tail.records)

    deadline = time.time() + timeout
    if mode != "daemon_kill":
        drive_kills(tail, kills, daemon.kill_trainer, finished, deadline, save_steps)
    else:
        restarts: list[float] = []

        def kill_daemon() -> None:
            daemon.kill()
            time.sleep(0.5)  # down for a moment while the trainer keeps going
            daemon.start()
            restarts.append(time.time())

        drive_kills(tail, kills, kill_daemon, finished, deadline, save_steps)
        result.extra["daemon_restarts"] = len(restarts)
    while time.time() < deadline and not finished():
        tail.poll()
        time.sleep(0.05)
    status: dict[str, Any] = {}
    while time.time() < deadline:
        status = daemon.status()
        if status.get("state") not in ("pending", "starting", "running", "backoff", "stopping"):
            break
        time.sleep(0.2)
    result.ended = time.time()
    tail.poll()
    result.records = tail.records
    last = max((r["step"] for r in tail.records if r.get("event") == "step"), default=0)
    result.completed = finished() and last >= steps and status.get("state") == "finished"
    result.launches = [float(a["started_at"]) for a in status.get("attempt_history") or []]
    result.extra["daemon_state"] = status.get("state")
    result.extra["daemon_goodput"] = status.get("goodput")
    result.extra["attempts"] = len(list((daemon.state / "runs" / JOB).glob("attempt-*")))
    events = json.loads(daemon.cli("events", JOB, "-n", "100000", "--json").stdout)["events"]
    started = [e for e in events if e["kind"] == "attempt_started"]
    result.extra["standby_takeovers"] = sum(1 for e in started if e["data"].get("standby"))
    result.extra["spare_takeovers"] = sum(1 for e in started if e["data"].get("spare"))
    result.extra["memory_resumes"] = sum(1 for e in events if e["kind"] == "memory_resume")
    daemon.kill()
    return result


# ------------------------------------------------------------------ baseline


def newest_checkpoint(out: Path, guarded: bool) -> Path | None:
    """HF's newest `checkpoint-*` by number (what a shell loop passes).

    `guarded`: only folders that hold `trainer_state.json`, which HF writes
    after the weights and optimizer (`ls -d out/checkpoint-*/trainer_state.json
    | sort -V | tail -1` in a careful script); otherwise complete or not.
    """
    found = [
        (int(m.group(1)), p)
        for p in out.glob("checkpoint-*")
        if (m := re.search(r"-(\d+)$", p.name))
        and (not guarded or (p / "trainer_state.json").exists())
    ]
    return max(found)[1] if found else None


def run_baseline(
    root: Path,
    env: dict[str, str],
    steps: int,
    save_steps: int,
    kills: list[Kill],
    timeout: float,
    mode: str,
) -> ModeResult:
    """Plain HF Trainer restarted at once by a loop, resuming from the newest checkpoint."""
    from ftsup.trainer.demo import demo_train_table, prepare_demo

    work = root / "w"
    prepare_demo(work, steps=steps, name=JOB)
    config = root / "train.json"
    table = demo_train_table(work.resolve(), steps=steps) | {"save_steps": save_steps}
    config.write_text(json.dumps(table))
    out, progress = root / "out", root / "progress.jsonl"
    tail = Tail(progress)
    current: list[subprocess.Popen[bytes]] = []
    result = ModeResult(mode=mode, launched=time.time(), kills=kills)
    guarded = mode == "baseline_guarded"
    deadline = time.time() + timeout
    attempts = 0

    def launch() -> None:
        nonlocal attempts
        attempts += 1
        argv = [sys.executable, str(HF_SCRIPT), "--config", str(config)]
        argv += ["--output_dir", str(out), "--progress", str(progress)]
        ckpt = newest_checkpoint(out, guarded)
        if ckpt is not None:
            argv += ["--resume_from_checkpoint", str(ckpt)]
        current[:] = [spawn(argv, env, root / "hf.log")]
        result.launches.append(time.time())

    def kill() -> None:
        kill_group(current[0])

    def loop_done() -> bool:
        """One turn of the restart loop: relaunch a dead attempt unless it exited 0."""
        code = current[0].poll()
        if code is None:
            return False
        if code == 0:
            return True
        if attempts > len(kills) + 5:  # a real loop would spin forever here
            tail.poll()
            result.extra["failure"] = (
                f"gave up after {attempts} attempts; the last resumed from "
                f"{ckpt.name if (ckpt := newest_checkpoint(out, guarded)) else None}"
            )
            raise TimeoutError(result.extra["failure"])
        launch()
        return False

    launch()
    with contextlib.suppress(TimeoutError):
        drive_kills(tail, kills, kill, loop_done, deadline, save_steps)
        while time.time() < deadline and not loop_done():
            time.sleep(0.01)
    kill_group(current[0])
    result.ended = time.time()
    tail.poll()
    result.records = tail.records
    last = max((r["step"] for r in tail.records if r.get("event") == "step"), default=0)
    result.completed = current[0].returncode == 0 and last >= steps
    result.extra["attempts"] = attempts
    return result


# ---------------------------------------------------------------------- main


def table(modes: dict[str, dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else str(v)

    rows = [
        "| mode | completed | kills (in save) | wall (s) | goodput | daemon goodput "
        "| goodput after 1st step | kill→step mean / worst (s) | steps lost | attempts |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in modes.items():
        dg = (m.get("daemon_goodput") or {}).get("goodput")
        rows.append(
            f"| {name} | {m['completed']} | {m['kills']} ({m['kills_in_save']}) | {m['wall_s']} "
            f"| {fmt(m['goodput'])} | {fmt(None if dg is None else round(dg, 3))} "
            f"| {fmt(m['goodput_after_first_step'])} "
            f"| {fmt(m['kill_to_step_mean_s'])} / {fmt(m['kill_to_step_worst_s'])} "
            f"| {m['steps_lost']} | {m.get('attempts')} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/chaos.json"))
    parser.add_argument("--quick", action="store_true", help="1500 steps, 6 kills per mode")
    parser.add_argument("--steps", type=int, help="max_steps (default 3000; --quick 1500)")
    parser.add_argument("--kills", type=int, help="kills per mode (default 12; --quick 6)")
    parser.add_argument("--save-steps", type=int, default=20, help="checkpoint interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--modes", default="ftsup,ftsup_disk,ftsup_cold,baseline,baseline_guarded,daemon_kill"
    )
    parser.add_argument(
        "--memory-overhead",
        type=float,
        help="[checkpoint] memory_overhead of the ftsup modes (default: the job's default); "
        "a mode `ftsup@0.05` sets it for that mode alone",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mode")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args(argv)
    names = args.modes.split(",")
    if len(set(names)) != len(names):
        parser.error(f"--modes {args.modes}: each mode once (repeat it in another invocation)")
    steps = args.steps or (1500 if args.quick else 3000)
    n_kills = args.kills or (6 if args.quick else 12)
    save_steps = args.save_steps
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    root = Path(tempfile.mkdtemp(prefix="ftc", dir="/tmp"))  # short: socket path limit
    REAPER.root = root
    # One plan for every mode, so that they are killed at the same steps.
    plan = plan_kills(random.Random(args.seed), steps, save_steps, n_kills)
    modes: dict[str, dict[str, Any]] = {}
    try:
        for mode in names:
            kills = [dataclasses.replace(k) for k in plan]
            if mode == "daemon_kill":  # saves are the trainer's business: no save timing
                for k in kills:
                    k.save = False
            where = root / mode.replace("@", "-")
            started = time.time()
            if mode.startswith("baseline"):
                res = run_baseline(where, env, steps, save_steps, kills, args.timeout, mode)
            else:
                base, _, budget = mode.partition("@")  # ftsup@0.05: that memory_overhead
                overhead = float(budget) if budget else args.memory_overhead
                res = run_ftsup(where, env, steps, save_steps, kills, args.timeout, base, overhead)
            modes[mode] = measure(res, steps) | res.extra
            print(
                f"{mode}: {json.dumps(modes[mode])} ({time.time() - started:.0f}s)",
                file=sys.stderr,
            )
    finally:
        REAPER.kill_all()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "config": {
            "steps": steps,
            "save_steps": save_steps,
            "kills_per_mode": n_kills,
            "seed": args.seed,
            "ftsup_backoff": BACKOFF,
            "model": "prepare_demo: tiny Llama, hidden 128, 4 layers, LoRA r16, batch 16",
            "OMP_NUM_THREADS": env["OMP_NUM_THREADS"],
            "memory_overhead": args.memory_overhead,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "modes": modes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(modes))
    return 0 if modes and all(m["completed"] for m in modes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
