"""An unmodified HF script restarted after its last save trains nothing more.

HF's Trainer resumed from a checkpoint at `max_steps` trains one more step (it
checks for the end only after a step) when `max_steps` ends inside an epoch:
the run would no longer end as it did. That restart happens: a torchrun worker
that aborts in interpreter teardown after training, a crash in the script's
final export. The instrumentation ends such a run before its first step, and
the rest of the script (`save_model`) runs on the checkpoint's weights. The
built-in trainer's guard is `run.already_finished`
(tests/trainer/test_exact_resume.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import ENV_PROGRESS_FILE
from ftsup.supervisor.daemon.launcher import bootstrap_dir
from tests.supervisor_harness import REPO, run_in_group

SCRIPT = REPO / "tests" / "scripts" / "plain_hf_train.py"
MAX_STEPS = 4  # 128 rows in batches of 8: 16 steps an epoch, so the end is inside one


def run_script(model: Path, output_dir: Path, progress: Path, *extra: str) -> str:
    """The script instrumented as a `[command]` job's (bootstrap first on PYTHONPATH)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FTSUP_")},
        "PYTHONPATH": str(bootstrap_dir()),
        ENV_PROGRESS_FILE: str(progress),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    argv = [
        sys.executable,
        str(SCRIPT),
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(MAX_STEPS),
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-2",
        "--seed",
        "0",
        "--use_cpu",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        *extra,
    ]
    code, log = run_in_group(argv, env, timeout=300)
    assert code == 0, log[-3000:]
    return log


def events(progress: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in progress.read_text().splitlines()]


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_script_resumed_at_max_steps_trains_no_step_and_saves_the_checkpoints_weights(
    tiny_model: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "out"
    run_script(tiny_model, output_dir, tmp_path / "first.jsonl")
    final = output_dir / f"checkpoint-{MAX_STEPS}"
    assert final.is_dir()
    (output_dir / "model.safetensors").unlink()  # the restart must write it again

    progress = tmp_path / "restart.jsonl"
    log = run_script(tiny_model, output_dir, progress, "--resume_from_checkpoint", str(final))
    seen = events(progress)
    assert [e["step"] for e in seen if e["event"] == "step"] == [], log[-3000:]
    start = next(e for e in seen if e["event"] == "train_start")
    assert start["step"] == MAX_STEPS
    end = next(e for e in seen if e["event"] == "train_end")
    assert (end["step"], end["reason"]) == (MAX_STEPS, "finished")
    assert "training is complete" in log
    assert not (output_dir / f"checkpoint-{MAX_STEPS + 1}").exists()
    # The script's save_model ran after train() returned, on the checkpoint's weights.
    saved, expected = weights(output_dir), weights(final)
    assert saved.keys() == expected.keys()
    assert all(bool((saved[name] == expected[name]).all()) for name in expected)
    state = json.loads((output_dir / "trainer_state.json").read_text())  # save_state
    assert state["global_step"] == MAX_STEPS
