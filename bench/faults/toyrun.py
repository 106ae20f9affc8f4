"""Toy jobs (tests/scripts/toy_trainer.py: real processes, real checkpoints) and the
checks that say whether a run survived.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

from bench.faults.daemon import Daemon
from bench.faults.outcomes import Case, Outcome
from bench.faults.procs import group_alive, newest_pids

REPO = Path(__file__).resolve().parents[2]
TOY_TRAINER = REPO / "tests" / "scripts" / "toy_trainer.py"


def toy_job(
    work: Path,
    name: str,
    *,
    steps: int = 40,
    save_steps: int = 5,
    step_time: float = 0.05,
    args: tuple[str, ...] = (),
    restart: str = "",
    env: dict[str, str] | None = None,
    output: Path | None = None,
) -> tuple[Path, Path]:
    """A job file for the toy trainer (real process, real checkpoints); (job file, output)."""
    out = output or work / f"{name}.out"
    argv = [sys.executable, str(TOY_TRAINER), "--output-dir", str(out)]
    argv += ["--max-steps", str(steps), "--save-steps", str(save_steps)]
    argv += ["--step-time", str(step_time), *args]
    env_line = ""
    if env:
        env_line = "env = {" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items()) + "}\n"
    text = (
        f'[job]\nname = "{name}"\noutput_dir = {json.dumps(str(out))}\n\n'
        f"[command]\nargv = {json.dumps(argv)}\n"
        'resume_args = ["--resume_from_checkpoint", "{checkpoint}"]\n'
        f'{env_line}\n[restart]\nbackoff = "0.1s"\nbackoff_max = "0.5s"\n'
        f"max_restarts = 50\ncrash_loop = 10\n{restart}"
    )
    path = work / f"{name}.toml"
    path.write_text(text)
    return path, out


def toy_expected(max_steps: int) -> int:
    value = 1
    for step in range(1, max_steps + 1):
        value = (value * 31 + step) % 1_000_003
    return value


def toy_checkpoint_valid(folder: Path) -> bool:
    """Whether a (possibly quarantined) toy checkpoint folder is complete and readable,
    judged independently of ftsup's own validation."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        data = (folder / "model.safetensors").read_bytes()
        header = int.from_bytes(data[:8], "little")
        json.loads(data[8 : 8 + header])
        if len(data) != 8 + header + 8 or not isinstance(state.get("global_step"), int):
            return False
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            with zipfile.ZipFile(folder / name) as archive:
                if archive.testzip() is not None:
                    return False
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
    return True


def quarantined_valid(out: Path) -> list[str]:
    """Valid checkpoints that were renamed `checkpoint-N.invalid-*` (quarantined)."""
    return sorted(p.name for p in out.glob("checkpoint-*.invalid-*") if toy_checkpoint_valid(p))


def _checkpoint_times(out: Path) -> list[tuple[int, float]]:
    """(step, time it became complete) of every valid checkpoint, quarantined ones too."""
    found = []
    for folder in out.glob("checkpoint-*"):
        step_text = folder.name.split("-", 1)[1].split(".", 1)[0]
        if step_text.isdigit() and toy_checkpoint_valid(folder):
            found.append((int(step_text), (folder / "trainer_state.json").stat().st_mtime))
    return sorted(found)


def judge_toy_run(
    daemon: Daemon,
    job: str,
    out: Path,
    steps: int,
    *,
    timeout: float,
    attempts: int | None = None,
    final: str = "finished",
) -> Case:
    """Whether the run of `job` survived: final state, exact result, one trainer at a time,
    every restart from the newest valid checkpoint, nothing valid quarantined."""
    status = daemon.wait_final(job, timeout)
    bad = quarantined_valid(out)
    case = Case(f"job {job}", Outcome.OK, quarantined_valid=len(bad))
    problems = []
    if status is None:
        now = daemon.status(job)
        if now is None:
            pids = newest_pids(daemon.state, job)
            orphan = pids is not None and group_alive(int(pids["pgid"]))
            problems.append(
                "the job vanished (status: not found or no answer)"
                + ("; its trainer trains on unsupervised" if orphan else "")
            )
        else:
            pids = newest_pids(daemon.state, job)
            gone = pids is not None and not group_alive(int(pids["pgid"]))
            problems.append(
                f"not final: still {now.get('state')} ({now.get('reason')})"
                + (" though its trainer and shim are gone" if gone else f" after {timeout:.0f}s")
            )
    elif status.get("state") != final:
        problems.append(f"ended {status.get('state')}: {status.get('reason')}")
    if final == "finished":
        try:
            result = json.loads((out / "final.json").read_text())
            if result != {"step": steps, "value": toy_expected(steps)}:
                problems.append(f"wrong result {result}: a step was lost or run twice")
        except (OSError, ValueError):
            problems.append("no final.json: the trainer did not finish")
    problems += _interleaved(out)
    if status is not None:
        problems += _older_resumes(status, out)
        if attempts is not None and status.get("attempts") != attempts:
            history = [
                f"#{a.get('n')} from step {a.get('start_step')}: {str(a.get('reason'))[:80]}"
                for a in status.get("attempt_history") or []
            ]
            problems.append(
                f"{status.get('attempts')} attempts recorded, expected {attempts} ({history})"
            )
    if bad:
        problems.append(f"valid checkpoints quarantined: {bad}")
    if problems:
        case.outcome = Outcome.LOST
        case.detail = "; ".join(problems)
    else:
        case.detail = (
            f"{status and status.get('state')}, {status and status.get('attempts')} attempts"
        )
    return case


def _interleaved(out: Path) -> list[str]:
    """Two trainers at once: a pid that writes steps again after another pid did."""
    try:
        lines = (out / "steps.log").read_text().splitlines()
    except OSError:
        return []
    seen: list[str] = []
    for line in lines:
        pid = line.split()[0]
        if not seen or seen[-1] != pid:
            if pid in seen:
                return [f"two trainers at once (pid {pid} wrote steps again after another)"]
            seen.append(pid)
    return []


def _older_resumes(status: dict[str, Any], out: Path) -> list[str]:
    """Attempts that started from an older checkpoint than the newest valid one then."""
    ckpts = _checkpoint_times(out)
    problems = []
    for attempt in status.get("attempt_history") or []:
        started = attempt.get("started_at")
        start_step = attempt.get("start_step") or 0
        if not isinstance(started, (int, float)) or attempt.get("n") == 1:
            continue
        newest = max((s for s, t in ckpts if t < started - 0.2), default=0)
        if newest > start_step:
            problems.append(
                f"attempt {attempt.get('n')} started from step {start_step} "
                f"though checkpoint-{newest} was valid"
            )
    return problems
