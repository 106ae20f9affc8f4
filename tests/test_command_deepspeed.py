"""A `[command]` job running a user's HF script with a DeepSpeed config (issue 16).

`tests/scripts/deepspeed_hf_train.py` knows nothing of ftsup. The job runs it
under torchrun, two ranks on the CPU, `--deepspeed ds_zero2.json` (the example's
config: a full fine-tune with ZeRO-2), saving every 2 of 8 steps. Both ranks
wait after checkpoint-4; the test then truncates rank 1's optimizer shard of
that checkpoint (a rank that died mid-write, after rank 0 wrote `latest`) and
SIGKILLs both ranks. The daemon must refuse checkpoint-4 (quarantine, with an
event naming the shard), resume from checkpoint-2, finish, and end with the
very weights of the same command run once without interruption (run alongside).
One scenario for the whole module (CI time); the tests read what it recorded.
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

from ftsup.supervisor.checkpoints.report import CheckpointReport
from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from tests.supervisor_harness import REPO, Harness, ftsup_check_json, wait_for

pytestmark = pytest.mark.slow  # trains real models: starts first (tests/conftest.py)

SCRIPT = REPO / "tests" / "scripts" / "deepspeed_hf_train.py"
DS_CONFIG = REPO / "examples" / "deepspeed-command" / "ds_zero2.json"
JOB = "zero2"
MAX_STEPS = 8
SAVE_STEPS = 2
CRASH_AFTER = 4  # both ranks wait after this step's checkpoint; then they are killed
SHARD = f"global_step{CRASH_AFTER}/zero_pp_rank_1_mp_rank_00_optim_states.pt"
ENDED = ("finished", "failed", "gave_up", "stopped")


@dataclass
class Observed:
    """What the scenario saw, for the tests to judge."""

    output_dir: Path
    reference_dir: Path
    held_status: dict[str, Any] = field(default_factory=dict)
    rank_pids: list[int] = field(default_factory=list)
    intact: CheckpointReport | None = None
    damaged: CheckpointReport | None = None
    finished: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    progress: list[dict[str, Any]] = field(default_factory=list)


def command(model: Path, output_dir: Path, hold_dir: Path | None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(MAX_STEPS),
        "--save_steps",
        str(SAVE_STEPS),
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--seed",
        "0",
        "--dataloader_num_workers",
        "0",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--deepspeed",
        str(DS_CONFIG),
    ]
    return argv + (["--hold_dir", str(hold_dir)] if hold_dir is not None else [])


def offline_env(root: Path) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # one thread per rank: DeepSpeed on CPU is then deterministic
    }


def job_file(harness: Harness, model: Path, output_dir: Path, hold_dir: Path) -> Path:
    env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in offline_env(harness.work).items())
    text = (
        f'[job]\nname = "{JOB}"\noutput_dir = "{output_dir}"\n\n'
        f"[command]\nargv = {json.dumps(command(model, output_dir, hold_dir))}\n"
        f"env = {{ {env} }}\n"
        'resume_args = ["--resume_from_checkpoint", "{checkpoint}"]\n\n'
        '[restart]\nbackoff = "0.1s"\nbackoff_max = "1s"\n'
    )
    path = harness.work / f"{JOB}.toml"
    path.write_text(text)
    return path


def start_reference(model: Path, root: Path) -> subprocess.Popen[bytes]:
    """The same command, uninstrumented and never interrupted (runs meanwhile)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTSUP_")}
    with (root / "reference.log").open("wb") as log:
        return subprocess.Popen(
            command(model, root / "reference", None),
            env={**env, **offline_env(root)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish_reference(proc: subprocess.Popen[bytes], root: Path) -> None:
    try:
        code = proc.wait(300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (root / "reference.log").read_text(errors="replace")
    assert code == 0, f"the reference run failed ({code}):\n{log[-3000:]}"


def held_ranks(harness: Harness, hold_dir: Path) -> list[int]:
    """Both ranks wait after step CRASH_AFTER (its checkpoint complete); their pids."""

    def both() -> list[int] | None:
        if exit_file(harness, 1).exists():
            raise AssertionError(f"{JOB} ended where it should wait: {harness.status(JOB)}")
        files = [hold_dir / f"held-{CRASH_AFTER}-rank{rank}" for rank in (0, 1)]
        texts = [f.read_text() if f.exists() else "" for f in files]
        if not all(t.endswith("\n") for t in texts):
            return None
        return [int(t) for t in texts]

    pids: list[int] = wait_for(both, 180, 0.05, f"both ranks to wait after step {CRASH_AFTER}")
    return pids


def shown_at(harness: Harness, step: int) -> dict[str, Any]:
    """The daemon's status once it shows `step` (the trainer waits there)."""

    def shown() -> dict[str, Any] | None:
        status = harness.status(JOB)
        return status if (status["progress"] or {}).get("step") == step else None

    return dict(wait_for(shown, 30, 0.2, f"status to show step {step}"))


def exit_file(harness: Harness, attempt: int) -> Path:
    """Written by the attempt's shim when the trainer ended: polled, it costs nothing
    (each `ftsup status` is a Python process, which two busy cores feel)."""
    return harness.state_dir / "runs" / JOB / f"attempt-{attempt}" / "exit.json"


def sigkill_ranks(pids: list[int]) -> None:
    """SIGKILL the two trainer ranks (after checking that each still is one)."""
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert SCRIPT.name.encode() in cmdline, cmdline
        os.kill(pid, signal.SIGKILL)


def truncate(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size // 2)


def run_scenario(harness: Harness, model: Path) -> Observed:
    holds = harness.work / "holds"
    holds.mkdir()
    (holds / f"hold-{CRASH_AFTER}").touch()
    seen = Observed(output_dir=harness.work / JOB, reference_dir=harness.work / "reference")
    reference = start_reference(model, harness.work)
    try:
        harness.cli("start", str(job_file(harness, model, seen.output_dir, holds)))
        seen.rank_pids = held_ranks(harness, holds)
        seen.held_status = shown_at(harness, CRASH_AFTER)
        newest = seen.output_dir / f"checkpoint-{CRASH_AFTER}"
        seen.intact = validate_checkpoint(newest)
        truncate(newest / SHARD)
        seen.damaged = validate_checkpoint(newest)
        sigkill_ranks(seen.rank_pids)
        (holds / f"hold-{CRASH_AFTER}").unlink()
        wait_for(exit_file(harness, 2).exists, 240, 0.1, "the resumed attempt to end")
        seen.finished = harness.wait_state(JOB, *ENDED, timeout=60)
        seen.events = list(harness.cli_json("events", JOB, "-n", "500")["events"])
        seen.progress = harness.progress_lines(JOB)
    finally:
        finish_reference(reference, harness.work)
    return seen


@pytest.fixture(scope="module")
def crashed(tiny_model: Path) -> Iterator[Observed]:
    harness = Harness()
    try:
        harness.start_daemon()
        yield run_scenario(harness, tiny_model)
    except BaseException:
        print(f"--- daemon log ---\n{harness.daemon_log()[-6000:]}")
        raise
    finally:
        harness.cleanup()


def test_the_script_knows_nothing_of_ftsup() -> None:
    source = SCRIPT.read_text()
    assert not re.search(r"^\s*(from|import)\s+ftsup", source, re.MULTILINE)


def test_every_step_is_reported_live_under_torchrun_and_deepspeed(crashed: Observed) -> None:
    instrumentation = crashed.held_status["instrumentation"]
    assert instrumentation["state"] == "attached", instrumentation
    assert instrumentation["trainer"] == "Trainer"
    progress = crashed.held_status["progress"]
    assert progress["step"] == CRASH_AFTER and progress["max_steps"] == MAX_STEPS
    assert isinstance(progress["loss"], float) and progress["loss"] > 0
    first = [line["step"] for line in crashed.progress if line.get("event") == "step"]
    assert first[:CRASH_AFTER] == list(range(1, CRASH_AFTER + 1))


def test_a_truncated_rank_shard_makes_a_real_zero2_checkpoint_invalid(crashed: Observed) -> None:
    intact, damaged = crashed.intact, crashed.damaged
    assert intact is not None and damaged is not None
    # As DeepSpeed wrote it: complete for both ranks, resumable.
    assert intact.valid and intact.resumable, intact.reason
    assert intact.details["deepspeed_tag"] == f"global_step{CRASH_AFTER}"
    assert intact.details["world_size"] == 2
    # `latest` still names the tag; only rank 1's shard is cut short.
    assert not damaged.valid
    assert damaged.reason is not None and damaged.reason.startswith(f"{SHARD} truncated")


def test_the_daemon_quarantines_it_and_resumes_the_older_checkpoint(crashed: Observed) -> None:
    finished = crashed.finished
    assert finished["state"] == "finished", finished
    killed, resumed = finished["attempt_history"][0], finished["attempt_history"][-1]
    assert killed["returncode"] != 0 and killed["last_step"] == CRASH_AFTER, killed
    assert not killed["stop_requested"]
    assert resumed["resume_from"] == str(crashed.output_dir / f"checkpoint-{CRASH_AFTER - 2}")
    assert resumed["start_step"] == CRASH_AFTER - 2
    quarantines = [e for e in crashed.events if e["kind"] == "quarantine"]
    assert len(quarantines) == 1, quarantines
    moved = Path(quarantines[0]["data"]["path"])
    assert moved.name.startswith(f"checkpoint-{CRASH_AFTER}.invalid-"), moved
    assert SHARD in quarantines[0]["message"]
    assert (moved / SHARD).stat().st_size > 0  # moved aside, never deleted
    # The trainer started twice: from scratch, then at the older checkpoint.
    starts = [line["step"] for line in crashed.progress if line.get("event") == "train_start"]
    assert starts == [0, CRASH_AFTER - 2]
    steps = [line["step"] for line in crashed.progress if line.get("event") == "step"]
    assert steps == [*range(1, CRASH_AFTER + 1), *range(CRASH_AFTER - 1, MAX_STEPS + 1)]


def test_the_resumed_run_ends_bit_identical_to_an_uninterrupted_one(crashed: Observed) -> None:
    import torch
    from safetensors.torch import load_file

    assert crashed.finished["state"] == "finished", crashed.finished
    ours = load_file(str(crashed.output_dir / "model.safetensors"))
    theirs = load_file(str(crashed.reference_dir / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    differ = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not differ, f"weights differ from the uninterrupted run: {differ}"
    # The checkpoint-4 written again after the resume is whole, for both ranks.
    again = validate_checkpoint(crashed.output_dir / f"checkpoint-{CRASH_AFTER}")
    assert again.valid and again.details["world_size"] == 2, again.reason


def test_the_example_job_passes_ftsup_check_and_uses_the_tested_config() -> None:
    answer = ftsup_check_json(DS_CONFIG.parent / "job.toml")
    argv = answer["job"]["command"]["argv"]
    assert argv[argv.index("--deepspeed") + 1] == DS_CONFIG.name
    assert answer["job"]["command"]["resume_args"] == ["--resume_from_checkpoint", "{checkpoint}"]
