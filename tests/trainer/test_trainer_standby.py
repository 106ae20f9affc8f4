"""The real `ftsup.trainer.standby` under the real standby shim: activated before it
has even finished warming up, it runs the attempt to the end like a cold trainer."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ftsup.supervisor.atomicio import read_json
from ftsup.supervisor.shim import EXIT_FILE, LOG_FILE
from ftsup.supervisor.spec_types import LaunchSection
from ftsup.supervisor.standby_shim import STANDBY_FILE
from ftsup.supervisor.trainer_launch import (
    build_trainer_argv,
    split_single_process_argv,
    standby_argv,
)
from tests.supervisor_harness import activate_standby, run_in_group, start_standby_shim, wait_for
from tests.trainer.trainer_helpers import TRAINER_ENV, write_config


def test_a_standby_activated_while_warming_runs_the_attempt(
    tiny_model: Path, arith_data: Path, tmp_path: Path, fake_daemon: subprocess.Popen[bytes]
) -> None:
    train = {"model": str(tiny_model), "dataset": [str(arith_data)], "max_steps": 3}
    config = write_config(tmp_path / "run", {**train, "save_steps": 3, "cutoff_len": 64})
    cold = build_trainer_argv(config, None, LaunchSection(), sys.executable)
    warm = standby_argv(cold)
    assert warm is not None
    output = tmp_path / "run" / "out"
    shim = start_standby_shim(tmp_path / "standby-1", output, fake_daemon.pid, warm)
    try:
        progress = tmp_path / "progress.jsonl"
        env = {**os.environ, **TRAINER_ENV, "FTSUP_PROGRESS_FILE": str(progress)}
        args = (split_single_process_argv(cold) or ([], []))[1]
        activation = {"attempt": 1, "job": "j", "args": args, "env": {**env, "FTSUP_ATTEMPT": "1"}}
        attempt_dir = tmp_path / "attempt-1"
        # Up (its FIFO open), its trainer still importing torch: activate now.
        wait_for(lambda: read_json(tmp_path / "standby-1" / STANDBY_FILE), 30, what="the shim")
        activate_standby(tmp_path / "standby-1", attempt_dir, activation)
        assert shim.wait(180) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shim.pid, signal.SIGKILL)
        shim.wait()
    log = (attempt_dir / LOG_FILE).read_text()
    assert read_json(attempt_dir / EXIT_FILE)["returncode"] == 0, log
    assert "ftsup standby: taking over as attempt 1" in log
    events = [json.loads(line)["event"] for line in progress.read_text().splitlines()]
    assert events[0] == "train_start" and events[-1] == "train_end"
    assert (output / "checkpoint-3" / "adapter_model.safetensors").is_file()


def test_a_takeover_imports_nothing_the_warm_up_could_have(
    tiny_model: Path, arith_data: Path, tmp_path: Path
) -> None:
    """Every module imported between activation and `train_start` is time on the
    restart's path: after the real warm-up (`WarmUp`, the job's config known), a
    resume imports none of ftsup's and not the model's architecture code
    (`modeling_llama`: 6 ms, ftsup's checkpoint checks: 15 ms, measured before
    the warm-up took them). Whatever else it imports is printed."""
    train = {"model": str(tiny_model), "dataset": [str(arith_data)], "max_steps": 3}
    config = write_config(tmp_path / "run", {**train, "save_steps": 2, "cutoff_len": 64})
    env = {**os.environ, **TRAINER_ENV}
    code, log = run_in_group(
        [sys.executable, "-m", "ftsup.trainer", "--config", str(config)], env, 180
    )
    assert code == 0, log
    checkpoint = tmp_path / "run" / "out" / "checkpoint-2"
    script = Path(__file__).parent.parent / "scripts" / "standby_takeover_imports.py"
    code, log = run_in_group([sys.executable, str(script), str(config), str(checkpoint)], env, 180)
    assert code == 0, log
    result = json.loads(log.strip().splitlines()[-1])
    assert result["code"] == 0 and result["prepared"], result
    ours = [m for m in result["new"] if m.startswith(("ftsup.", "transformers.models."))]
    assert ours == [], result["new"]
