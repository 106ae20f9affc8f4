"""Unmodified HF scripts under the daemon: the bootstrap instruments them (issue 14).

`tests/scripts/plain_hf_train.py` (a `transformers.Trainer` script) and
`tests/scripts/trl_sft_train.py` (TRL's `SFTTrainer`) know nothing of ftsup. Run
as `[command]` jobs, they must still report every step with its loss before
their first checkpoint, save where they are on `ftsup save` and `ftsup stop`
(then exit 75: `stopped`), and resume from that step to the very same weights
as a run that was never interrupted. Each scenario runs once (module fixture);
the tests read what it recorded. The scripts wait at `hold-<step>` files, so
every action lands at a known step however fast the machine is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.supervisor_harness import REPO, Harness, ftsup_check_json, wait_for

pytestmark = pytest.mark.slow  # trains real models: starts first (tests/conftest.py)

SCRIPTS = REPO / "tests" / "scripts"
EXAMPLES = REPO / "examples"
STATES_AT_REST = ("stopped", "finished", "failed", "gave_up")
ENDED = ("finished", "failed", "gave_up")


@dataclass
class Run:
    """A training command and how it is laid out (one per scenario)."""

    name: str
    script: str
    max_steps: int
    save_steps: int
    extra: tuple[str, ...] = ()

    def argv(self, model: Path, output_dir: Path, hold_dir: Path | None) -> list[str]:
        args = [
            sys.executable,
            str(SCRIPTS / self.script),
            "--model_name_or_path",
            str(model),
            "--output_dir",
            str(output_dir),
            "--max_steps",
            str(self.max_steps),
            "--save_steps",
            str(self.save_steps),
            "--logging_steps",
            "1",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "1e-3",
            "--seed",
            "0",
            "--use_cpu",
            "--dataloader_num_workers",
            "0",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            *self.extra,
        ]
        return args + (["--hold_dir", str(hold_dir)] if hold_dir is not None else [])


@dataclass
class Observed:
    """What a scenario saw, for the tests to judge."""

    output_dir: Path
    reference_dir: Path
    held_status: dict[str, Any] = field(default_factory=dict)
    held_status_text: str = ""
    checkpoints_when_held: list[int] = field(default_factory=list)
    checkpoints_before_stop: list[int] = field(default_factory=list)
    stop_hold: int = 0
    stopped: dict[str, Any] = field(default_factory=dict)
    checkpoints_after_stop: list[int] = field(default_factory=list)
    final_model_after_stop: bool = False
    finished: dict[str, Any] = field(default_factory=dict)
    progress: list[dict[str, Any]] = field(default_factory=list)
    stopped_log: str = ""  # the end of the stopped attempt's output, for failure messages


def _offline_env(root: Path) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


def _job_file(harness: Harness, run: Run, model: Path, hold_dir: Path) -> Path:
    output_dir = harness.work / run.name
    env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in _offline_env(harness.work).items())
    text = (
        f'[job]\nname = "{run.name}"\noutput_dir = "{output_dir}"\n\n'
        f"[command]\nargv = {json.dumps(run.argv(model, output_dir, hold_dir))}\n"
        f"env = {{ {env} }}\n"
        'resume_args = ["--resume_from_checkpoint", "{checkpoint}"]\n\n'
        '[restart]\nbackoff = "0.1s"\nbackoff_max = "1s"\n'
    )
    path = harness.work / f"{run.name}.toml"
    path.write_text(text)
    return path


def _start_reference(run: Run, model: Path, root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """The same command, uninstrumented and never interrupted (runs meanwhile)."""
    output_dir = root / f"{run.name}-reference"
    log = (root / f"{run.name}-reference.log").open("wb")
    proc = subprocess.Popen(
        run.argv(model, output_dir, None),
        env={**_clean_env(), **_offline_env(root)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, output_dir


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FTSUP_")}


def _finish_reference(proc: subprocess.Popen[bytes], root: Path, name: str) -> None:
    try:
        code = proc.wait(300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (root / f"{name}-reference.log").read_text(errors="replace")
    assert code == 0, f"the reference run failed ({code}):\n{log[-3000:]}"


def _checkpoints(output_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (HF writes trainer_state.json last)."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / "trainer_state.json").exists():
            found.append(int(suffix))
    return sorted(found)


def _held_at(harness: Harness, job: str, step: int) -> dict[str, Any]:
    """Wait until the trainer reported `step` (it then waits at `hold-<step>`) and the
    daemon shows it. The file is polled first: each status call is a Python process."""

    def written() -> bool:
        lines = harness.progress_lines(job)
        return any(line.get("event") == "step" and line.get("step") == step for line in lines)

    wait_for(written, 120, 0.05, f"{job} to report step {step}")

    def shown() -> dict[str, Any] | None:
        status = harness.status(job)
        if status["state"] in STATES_AT_REST:
            raise AssertionError(f"{job} ended at step {step}, where it should wait: {status}")
        return status if (status["progress"] or {}).get("step") == step else None

    return dict(wait_for(shown, 30, 0.2, f"status to show step {step} of {job}"))


def _ended(harness: Harness, job: str, attempt: int, *states: str) -> dict[str, Any]:
    """Wait for the attempt's exit record (cheap), then for the daemon's verdict."""
    exit_file = harness.state_dir / "runs" / job / f"attempt-{attempt}" / "exit.json"
    wait_for(exit_file.exists, 240, 0.1, f"attempt {attempt} of {job} to end")
    return harness.wait_state(job, *states, timeout=60)


def _run_scenario(
    harness: Harness, run: Run, model: Path, *, save_hold: int | None, stop_hold: int
) -> Observed:
    """Start; [save at `save_hold`]; stop at `stop_hold`; restart; run to the end."""
    holds = harness.work / f"{run.name}-holds"
    holds.mkdir()
    for step in (save_hold, stop_hold):
        if step is not None:
            (holds / f"hold-{step}").touch()
    reference, reference_dir = _start_reference(run, model, harness.work)
    seen = Observed(output_dir=harness.work / run.name, reference_dir=reference_dir)
    try:
        harness.cli("start", str(_job_file(harness, run, model, holds)))
        first_hold = save_hold if save_hold is not None else stop_hold
        seen.held_status = _held_at(harness, run.name, first_hold)
        seen.held_status_text = harness.cli("status", run.name).stdout
        seen.checkpoints_when_held = _checkpoints(seen.output_dir)
        if save_hold is not None:
            harness.cli("save", run.name)
            (holds / f"hold-{save_hold}").unlink()
            _held_at(harness, run.name, stop_hold)
        seen.checkpoints_before_stop = _checkpoints(seen.output_dir)
        seen.stop_hold = stop_hold
        harness.cli("stop", run.name)
        # The daemon signalled the shim, which forwards SIGTERM: let the step go once
        # the daemon says so (the forward itself takes microseconds).
        harness.wait_state(run.name, "stopping", *STATES_AT_REST)
        (holds / f"hold-{stop_hold}").unlink()
        seen.stopped = _ended(harness, run.name, 1, *STATES_AT_REST)
        stdout = harness.state_dir / "runs" / run.name / "attempt-1" / "stdout.log"
        seen.stopped_log = stdout.read_text(errors="replace")[-4000:] if stdout.exists() else ""
        seen.checkpoints_after_stop = _checkpoints(seen.output_dir)
        seen.final_model_after_stop = (seen.output_dir / "model.safetensors").exists()
        harness.cli("restart", run.name)
        seen.finished = _ended(harness, run.name, 2, *ENDED)
        seen.progress = harness.progress_lines(run.name)
    finally:
        _finish_reference(reference, harness.work, run.name)
    return seen


def observe(run: Run, model: Path, *, save_hold: int | None, stop_hold: int) -> Iterator[Observed]:
    """One scenario under a daemon of its own, for a module fixture (`yield from`)."""
    harness = Harness()
    try:
        harness.start_daemon()
        yield _run_scenario(harness, run, model, save_hold=save_hold, stop_hold=stop_hold)
    except BaseException:
        print(f"--- daemon log ---\n{harness.daemon_log()[-6000:]}")
        raise
    finally:
        harness.cleanup()


@pytest.fixture(scope="module")
def plain(tiny_model: Path) -> Iterator[Observed]:
    run = Run("plain", "plain_hf_train.py", max_steps=30, save_steps=10)
    yield from observe(run, tiny_model, save_hold=3, stop_hold=12)


@pytest.fixture(scope="module")
def trl(tiny_model: Path) -> Iterator[Observed]:
    extra = ("--max_length", "32")
    run = Run("sft", "trl_sft_train.py", max_steps=16, save_steps=5, extra=extra)
    yield from observe(run, tiny_model, save_hold=None, stop_hold=7)


def _assert_same_weights(trained: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    ours = load_file(str(trained / "model.safetensors"))
    theirs = load_file(str(reference / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    differ = [name for name in ours if not bool((ours[name] == theirs[name]).all())]
    assert not differ, f"weights differ from the uninterrupted run: {differ}"


def _stop_step(seen: Observed) -> int:
    return int(seen.stopped["last_exit"]["last_step"])


# plain transformers.Trainer --------------------------------------------------------


def test_the_scripts_know_nothing_of_ftsup() -> None:
    for script in ("plain_hf_train.py", "trl_sft_train.py"):
        source = (SCRIPTS / script).read_text()
        assert not re.search(r"^\s*(from|import)\s+ftsup", source, re.MULTILINE), script


def test_status_reports_the_job_as_instrumented(plain: Observed) -> None:
    instrumentation = plain.held_status["instrumentation"]
    assert instrumentation["mode"] == "on"
    assert instrumentation["state"] == "attached", instrumentation
    assert instrumentation["trainer"] == "Trainer"
    assert "attached to Trainer" in plain.held_status_text


def test_each_step_and_its_loss_are_live_before_the_first_checkpoint(plain: Observed) -> None:
    progress = plain.held_status["progress"]
    assert progress["step"] == 3 and progress["max_steps"] == 30
    assert isinstance(progress["loss"], float) and progress["loss"] > 0
    # Without the bootstrap a plain script's progress would only come from a checkpoint.
    assert plain.checkpoints_when_held == []
    first_steps = [line["step"] for line in plain.progress if line.get("event") == "step"][:3]
    assert first_steps == [1, 2, 3]


def test_save_now_writes_a_checkpoint_between_periodic_saves(plain: Observed) -> None:
    # Asked while the trainer waited after step 3: it saves at the end of step 4.
    assert plain.checkpoints_before_stop == [4, 10]


def test_stop_saves_the_step_reached_and_ends_stopped(plain: Observed) -> None:
    stopped = plain.stopped
    assert stopped["state"] == "stopped", stopped
    assert stopped["last_exit"]["returncode"] == 75, stopped["last_exit"]
    step = _stop_step(plain)
    assert step > plain.stop_hold and step % 10 != 0  # not a periodic save
    assert plain.checkpoints_after_stop == [4, 10, step]
    state = json.loads((plain.output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step
    # The rest of the script (its final save_model) did not run on a half-trained model.
    assert not plain.final_model_after_stop


def test_restart_resumes_at_the_stop_step_and_matches_an_uninterrupted_run(
    plain: Observed,
) -> None:
    finished = plain.finished
    assert finished["state"] == "finished", finished
    step = _stop_step(plain)
    resumed = finished["attempt_history"][-1]
    assert resumed["resume_from"] == str(plain.output_dir / f"checkpoint-{step}")
    starts = [line for line in plain.progress if line.get("event") == "train_start"]
    assert [line["step"] for line in starts] == [0, step]
    assert starts[-1]["resumed_from"] == resumed["resume_from"]
    # Across both attempts every step ran once: none lost, none repeated.
    steps = [line["step"] for line in plain.progress if line.get("event") == "step"]
    assert steps == list(range(1, 31))
    _assert_same_weights(plain.output_dir, plain.reference_dir)


# TRL SFTTrainer ----------------------------------------------------------------------


def test_trl_sft_trainer_stops_at_its_step_and_resumes_bit_identically(trl: Observed) -> None:
    assert trl.held_status["instrumentation"]["trainer"] == "SFTTrainer"
    assert trl.held_status["progress"]["loss"] is not None
    stopped = trl.stopped
    assert stopped["state"] == "stopped" and stopped["last_exit"]["returncode"] == 75
    step = _stop_step(trl)
    assert step > trl.stop_hold and step % 5 != 0
    assert trl.checkpoints_after_stop == [5, step]
    finished = trl.finished
    assert finished["state"] == "finished", finished
    assert finished["attempt_history"][-1]["resume_from"] == str(
        trl.output_dir / f"checkpoint-{step}"
    )
    starts = [line["step"] for line in trl.progress if line.get("event") == "train_start"]
    assert starts == [0, step]
    steps = [line["step"] for line in trl.progress if line.get("event") == "step"]
    assert steps == list(range(1, 17))
    _assert_same_weights(trl.output_dir, trl.reference_dir)


# examples ----------------------------------------------------------------------------


@pytest.mark.parametrize("example", ["trl-sft", "axolotl", "llamafactory"])
def test_example_job_files_pass_ftsup_check(example: str) -> None:
    answer = ftsup_check_json(EXAMPLES / example / "job.toml")
    assert answer["job"]["command"]["resume_args"], "an example must say how to resume"
