"""PENDING (fails today): a command behind `accelerate launch` keeps ftsup's signal contract.

`accelerate launch` (and Axolotl's default launcher, which execs it) is the shim's
direct child; it has no handler for SIGTERM or SIGUSR2, so both kill it at once, and
the shim then SIGKILLs the group: the trainer never saves.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest



from tests.supervisor_harness import Harness  # noqa: E402
from tests.test_instrumented_jobs import Observed, Run, _run_scenario, tiny_model  # noqa: E402, F401


@dataclass
class LaunchedRun(Run):
    def argv(self, model: Path, output_dir: Path, hold_dir: Path | None) -> list[str]:
        accelerate = str(Path(sys.executable).parent / "accelerate")
        launch = [accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
        plain = super().argv(model, output_dir, hold_dir)
        return launch + plain[1:]  # the script instead of `python script`


@pytest.fixture(scope="module")
def launched(tiny_model: Path) -> Iterator[Observed]:
    harness = Harness()
    try:
        harness.start_daemon()
        run = LaunchedRun("launched", "plain_hf_train.py", max_steps=30, save_steps=10)
        yield _run_scenario(harness, run, tiny_model, save_hold=3, stop_hold=12)
    finally:
        harness.cleanup()


def test_save_and_stop_reach_a_trainer_behind_accelerate_launch(launched: Observed) -> None:
    assert launched.checkpoints_before_stop == [4, 10]  # `ftsup save` saved, nothing crashed
    assert launched.stopped["state"] == "stopped"
    assert launched.stopped["attempts"] == 1
    step = int(launched.stopped["last_exit"]["last_step"])
    assert step > 12 and launched.checkpoints_after_stop == [4, 10, step]
    assert launched.finished["state"] == "finished"
    assert launched.finished["attempt_history"][-1]["resume_from"].endswith(f"checkpoint-{step}")
