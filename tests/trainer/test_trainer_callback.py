"""`FtsupCallback` in a plain HF Trainer script: progress, SIGUSR2 save, SIGTERM stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer.trainer_helpers import TRAINER_ENV

SCRIPT = Path(__file__).with_name("hf_script.py")


def read_events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_step(proc: subprocess.Popen[bytes], progress: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while not any(e["event"] == "step" and e["step"] == step for e in read_events(progress)):
        assert proc.poll() is None, "script exited early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.slow
def test_any_hf_script_gets_progress_and_signal_handling(tiny_model: Path, tmp_path: Path) -> None:
    progress = tmp_path / "progress.jsonl"
    env = {**os.environ, **TRAINER_ENV, "FTSUP_PROGRESS_FILE": str(progress)}
    argv = [sys.executable, str(SCRIPT), str(tiny_model), str(tmp_path / "out"), "1000"]
    log = (tmp_path / "script.log").open("wb")
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for_step(proc, progress, 2)
        proc.send_signal(signal.SIGUSR2)  # checkpoint, keep going
        wait_for_step(proc, progress, 6)
        proc.send_signal(signal.SIGTERM)  # checkpoint, stop
        assert proc.wait(120) == 75, (tmp_path / "script.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    events = read_events(progress)
    assert events[0]["event"] == "train_start" and events[0]["max_steps"] == 1000
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))
    assert all(isinstance(e["loss"], float) and e["tokens_per_s"] is None for e in steps)
    saved = [e for e in events if e["event"] == "checkpoint_saved"]
    assert len(saved) == 2 and saved[-1]["step"] == steps[-1]["step"]
    for event in saved:
        folder = Path(str(event["path"]))
        assert (folder / "trainer_state.json").exists() and (folder / "model.safetensors").exists()
    assert events[-1]["event"] == "train_end" and events[-1]["reason"] == "stopped"


def test_time_based_save_and_stop_flags(tmp_path: Path) -> None:
    """The callback's decisions at a step boundary, on real HF state objects."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from ftsup.trainer.callback import FtsupCallback
    from ftsup.trainer.signals import REQUESTS

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state = TrainerState(max_steps=10)
    progress = tmp_path / "progress.jsonl"
    # An hour cannot have elapsed since train_begin however loaded the machine is;
    # 50 ms surely have once we slept them (the interval is read at every step).
    callback = FtsupCallback(progress, save_every=3600, install_signal_handlers=False)
    callback.on_train_begin(args, state, TrainerControl())

    state.global_step = 1
    control = TrainerControl()
    callback.on_step_end(args, state, control)
    assert not control.should_save  # save_every not yet elapsed
    callback.save_every = 0.05
    time.sleep(0.06)
    state.global_step = 2
    callback.on_step_end(args, state, control)
    assert control.should_save and not control.should_training_stop

    REQUESTS.stop = True
    state.global_step = 3
    control = TrainerControl()
    callback.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop and callback.stopped
    assert not REQUESTS.stop, "a request is consumed once"

    REQUESTS.stop = True  # during the last step: training simply ends
    state.global_step = 10
    callback.stopped = False
    callback.on_step_end(args, state, control := TrainerControl())
    assert control.should_training_stop and not callback.stopped
    steps = [e["step"] for e in read_events(progress) if e["event"] == "step"]
    assert steps == [1, 2, 3, 10]
