"""The three runs of the LLaMA-Factory benchmark and what each one observed.

- `reference`: `llamafactory-cli train` alone, never interrupted (the weights
  every supervised run must end with, bit for bit).
- `instrumented`: the same command as an ftsup `[command]` job (bootstrap on):
  live steps, `ftsup save` mid-run, `ftsup stop` mid-run, `ftsup restart`.
- `uninstrumented`: `instrument = false`: what the log readers give; the
  trainer is SIGKILLed mid-run (the daemon resumes it), then `ftsup stop`ped,
  then restarted.

Actions are triggered by the step the run has reached, read from ftsup (with
the bootstrap) or from LF's own `trainer_log.jsonl` (without), so a slow or
fast machine changes where they land but not what must hold.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.llamafactory.daemon import AT_REST, ENDED, PrivateDaemon, wait_for
from bench.llamafactory.workdir import Workdir, offline_env

ADAPTER = "adapter_model.safetensors"
TRAINER_LOG = "trainer_log.jsonl"  # LLaMA-Factory's LogCallback, one line per logged step
# transformers' Trainer says where it resumed (checked in the attempt's log).
RESUMED_RE = re.compile(r"Resuming training from checkpoint with epoch \d+ and global step (\d+)")


@dataclass
class Seen:
    """One supervised run: the daemon's view over time, and the facts at each action."""

    job: str
    wall_s: float = 0.0
    live: list[dict[str, Any]] = field(default_factory=list)  # distinct progress the daemon showed
    instrumentation: dict[str, Any] | None = None
    save_requested_at: int | None = None
    checkpoints_before_stop: list[int] = field(default_factory=list)
    kill_requested_at: int | None = None
    killed_at: int | None = None  # the last step LF logged before the kill
    stop_requested_at: int | None = None
    save_refused: dict[str, Any] = field(default_factory=dict)
    stopped: dict[str, Any] = field(default_factory=dict)
    checkpoints_after_stop: list[int] = field(default_factory=list)
    final_model_after_stop: bool = False
    finished: dict[str, Any] = field(default_factory=dict)
    progress_steps: list[int] = field(default_factory=list)  # progress.jsonl steps with a loss
    attempts: int = 0  # attempt folders on disk (status counts those since the last restart)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    same_as_reference: dict[str, Any] = field(default_factory=dict)


def checkpoints(output_dir: Path) -> list[int]:
    """Steps of the complete HF checkpoints (trainer_state.json is written last)."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / "trainer_state.json").exists():
            found.append(int(suffix))
    return sorted(found)


def lf_log_steps(output_dir: Path) -> list[int]:
    """`current_steps` of LF's trainer_log.jsonl, in file order (appended across attempts)."""
    path = output_dir / TRAINER_LOG
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["current_steps"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line being written
    return steps


def compare_adapters(ours: Path, reference: Path) -> dict[str, Any]:
    """Every LoRA tensor equal to the reference's (and whether the files are byte-equal)."""
    from safetensors.torch import load_file

    a, b = load_file(str(ours / ADAPTER)), load_file(str(reference / ADAPTER))
    names = a.keys() | b.keys()
    differ = sorted(k for k in names if k not in a or k not in b or not a[k].equal(b[k]))
    return {
        "tensors": len(a),
        "differ": differ,
        "bit_identical": not differ,
        "files_byte_equal": (ours / ADAPTER).read_bytes() == (reference / ADAPTER).read_bytes(),
    }


def run_reference(work: Workdir, venv: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start the uninterrupted run (no ftsup anywhere in its environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTSUP_")}
    env.pop("PYTHONPATH", None)
    env.update(offline_env(work.root))
    out = work.output_dir("reference")
    work.lf_yaml("reference")
    log = (work.root / "reference" / "lf.log").open("wb")
    proc = subprocess.Popen(
        work.lf_argv(venv, "reference"),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, out


class Watch:
    """Polls the daemon; keeps each distinct progress state it showed."""

    def __init__(self, daemon: PrivateDaemon, seen: Seen) -> None:
        self.daemon, self.seen = daemon, seen
        self.phase = "first run"  # set by the scenario at each action
        self._last: tuple[Any, ...] | None = None

    def poll(self) -> dict[str, Any]:
        status = self.daemon.status(self.seen.job)
        progress = status.get("progress") or {}
        key = (progress.get("step"), progress.get("loss"), progress.get("last_checkpoint_step"))
        if progress and key != self._last:
            self._last = key
            self.seen.live.append(
                {
                    "t": round(time.monotonic(), 3),
                    "phase": self.phase,
                    "step": progress.get("step"),
                    "loss": progress.get("loss"),
                    "last_checkpoint_step": progress.get("last_checkpoint_step"),
                }
            )
        if status.get("instrumentation"):
            self.seen.instrumentation = status["instrumentation"]
        return status

    def until_step(
        self, step: int, read_step: Callable[[dict[str, Any]], int], timeout: float = 300
    ) -> int:
        """Poll until `read_step(status)` >= step; fail if the job comes to rest first."""

        def reached() -> int | None:
            status = self.poll()
            if status["state"] in AT_REST:
                raise RuntimeError(f"{self.seen.job} came to rest before step {step}: {status}")
            now = read_step(status)
            return now if now >= step else None

        return wait_for(reached, timeout, f"{self.seen.job} to reach step {step}")

    def until_state(self, *states: str, timeout: float = 300) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.poll()
            return status if status["state"] in states else None

        return wait_for(reached, timeout, f"{self.seen.job} to be {'/'.join(states)}")


def _resumes(daemon: PrivateDaemon, job: str, status: dict[str, Any]) -> list[dict[str, Any]]:
    """For each attempt that resumed: the checkpoint ftsup gave, and where HF says it resumed."""
    found = []
    for attempt in status.get("attempt_history") or []:
        if not attempt.get("resume_from"):
            continue
        match = RESUMED_RE.search(daemon.attempt_log(job, int(attempt["n"])))
        found.append(
            {
                "attempt": attempt["n"],
                "resume_from": attempt["resume_from"],
                "hf_resumed_at_step": int(match.group(1)) if match else None,
            }
        )
    return found


def _finish(daemon: PrivateDaemon, seen: Seen) -> None:
    """Record the end: attempts of both phases (before and after `ftsup restart`)."""
    seen.finished = daemon.status(seen.job)
    before = _resumes(daemon, seen.job, seen.stopped)
    after = _resumes(daemon, seen.job, seen.finished)
    seen.resumes = before + [r for r in after if r not in before]
    seen.progress_steps = [
        int(line["step"])
        for line in daemon.progress_lines(seen.job)
        if line.get("event") == "step" and line.get("loss") is not None
    ]
    seen.attempts = len(list(daemon.layout.run_dir(seen.job).glob("attempt-*")))


def _daemon_step(status: dict[str, Any]) -> int:
    return int((status.get("progress") or {}).get("step") or 0)


def instrumented(
    daemon: PrivateDaemon, work: Workdir, venv: Path, *, save_at: int, stop_at: int
) -> Seen:
    """Bootstrap on: save now at `save_at`, stop at `stop_at`, restart, run to the end."""
    seen = Seen(job="lf-instrumented")
    start = time.monotonic()
    watch = Watch(daemon, seen)
    out = work.output_dir(seen.job)
    daemon.cli("start", str(work.job_file(venv, seen.job, instrument=True)))
    seen.save_requested_at = watch.until_step(save_at, _daemon_step)
    daemon.cli("save", seen.job)
    watch.phase = "after save"
    seen.stop_requested_at = watch.until_step(stop_at, _daemon_step)
    seen.checkpoints_before_stop = checkpoints(out)
    daemon.cli("stop", seen.job)
    watch.phase = "stopping"
    seen.stopped = watch.until_state(*AT_REST)
    seen.checkpoints_after_stop = checkpoints(out)
    seen.final_model_after_stop = (out / ADAPTER).exists()
    daemon.cli("restart", seen.job)
    watch.phase = "after restart"
    watch.until_state(*ENDED)
    _finish(daemon, seen)
    seen.wall_s = round(time.monotonic() - start, 1)
    return seen


def uninstrumented(
    daemon: PrivateDaemon, work: Workdir, venv: Path, *, kill_at: int, stop_at: int
) -> Seen:
    """Bootstrap off: SIGKILL at `kill_at`, stop at `stop_at` after the resume, restart."""
    seen = Seen(job="lf-plain")
    start = time.monotonic()
    watch = Watch(daemon, seen)
    out = work.output_dir(seen.job)
    daemon.cli("start", str(work.job_file(venv, seen.job, instrument=False)))
    # The trigger reads LF's own log: what ftsup shows without the bootstrap is
    # what this run measures, not what it may rely on.
    seen.kill_requested_at = watch.until_step(kill_at, lambda _: max(lf_log_steps(out), default=0))
    lines_at_kill = len(lf_log_steps(out))
    daemon.cli("signal", seen.job, "KILL")
    watch.phase = "after kill"

    def after_kill(_: dict[str, Any]) -> int:
        later = lf_log_steps(out)[lines_at_kill:]
        return max(later, default=0)

    # SIGUSR2's default action would end LF: ftsup must refuse, and the run go on.
    watch.until_step(kill_at, after_kill)
    asked = daemon.cli("save", seen.job, check=False)
    seen.save_refused = {
        "returncode": asked.returncode,
        "message": (asked.stderr or asked.stdout).strip(),
    }
    seen.stop_requested_at = watch.until_step(stop_at, after_kill)
    seen.checkpoints_before_stop = checkpoints(out)
    steps = lf_log_steps(out)  # attempt 1's lines, then the resumed attempt's
    seen.killed_at = next((a for a, b in itertools.pairwise(steps) if b <= a), None)
    daemon.cli("stop", seen.job)
    watch.phase = "stopping"
    seen.stopped = watch.until_state(*AT_REST)
    seen.checkpoints_after_stop = checkpoints(out)
    seen.final_model_after_stop = (out / ADAPTER).exists()
    daemon.cli("restart", seen.job)
    watch.phase = "after restart"
    watch.until_state(*ENDED)
    _finish(daemon, seen)
    seen.wall_s = round(time.monotonic() - start, 1)
    return seen
