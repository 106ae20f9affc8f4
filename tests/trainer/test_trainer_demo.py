"""The demo job: deterministic offline preparation, a crash, a resume, falling loss."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from ftsup.supervisor.spec import load_spec
from ftsup.supervisor.trainer_launch import write_train_json
from ftsup.trainer.checkpointing import newest_complete_checkpoint
from ftsup.trainer.demo import demo_fault_env, prepare_demo, sample_answers
from tests.trainer.trainer_helpers import TrainerProcess


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_demo_is_deterministic_and_a_valid_job(tmp_path: Path) -> None:
    first = prepare_demo(tmp_path / "a", steps=40)
    second = prepare_demo(tmp_path / "b", steps=40)
    for name in ("model/model.safetensors", "model/tokenizer.json", "data/arithmetic.jsonl"):
        assert digest(first.parent / name) == digest(second.parent / name), name
    spec = load_spec(first)
    assert spec.train is not None and spec.train.max_steps == 40
    assert spec.train.save_steps is not None and 40 // spec.train.save_steps >= 4
    assert spec.output_dir == first.parent / "output"
    assert first.read_text().replace(str(first.parent), "") == second.read_text().replace(
        str(second.parent), ""
    )


@pytest.mark.slow
def test_demo_job_crashes_once_resumes_and_learns(
    tmp_path: Path, start_trainer: Callable[..., TrainerProcess]
) -> None:
    job = prepare_demo(tmp_path / "demo", steps=96)
    spec = load_spec(job)
    assert spec.train is not None
    config = write_train_json(
        job.parent / "run" / "train.json",
        spec.train,
        output_dir=spec.output_dir,
        job_name=spec.name,
        async_save=False,  # checkpoint 36 is complete before the planned crash at 48
    )
    fault = demo_fault_env(job.parent, step=48)
    crashed = start_trainer(config, env=fault)
    assert crashed.wait() == -signal.SIGKILL, crashed.log()
    resume = newest_complete_checkpoint(spec.output_dir)
    # The fault fires at the end of step 48, before that step's save: 36 is the newest.
    assert resume is not None and resume.name == "checkpoint-36"

    resumed = start_trainer(config, resume_from=resume, env=fault)  # fires only once
    assert resumed.wait() == 0, resumed.log()
    losses = [e["loss"] for e in resumed.events() if e["event"] == "step" and e["loss"]]
    assert max(losses[:2]) > min(losses[-2:]) + 1.0, f"loss did not fall: {losses}"

    answers = sample_answers(job.parent / "model", spec.output_dir / "checkpoint-96")
    assert answers[0][0] == "What is 2+3?" and len(answers) == 4
    # 96 steps teach the answer's form, a number, not yet the right one (that takes
    # ~400: tests/test_demo.py checks the sums); the untrained model says no number.
    assert all(answer.isdigit() for _, answer in answers), answers
