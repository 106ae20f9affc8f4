"""Progress from a trainer's own logs: HF/tqdm output and LLaMA-Factory's trainer_log.jsonl.

The parser tests run on bytes captured from real programs: a tiny transformers 5.24
`Trainer` on CPU (12 steps, logging_steps=3, eval every 6 steps, save every 5,
`disable_tqdm=False`, PYTHONUNBUFFERED=1 as the daemon starts trainers, stdout and
stderr into one file as the shim does), the same run resumed from checkpoint-5,
and `datasets.Dataset.map` bars. LLaMA-Factory lines follow its 0.9.5
`LogCallback.on_log` (see tests/scripts/log_writer.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path

from ftsup.supervisor.daemon.follower import RunFollower
from ftsup.supervisor.spec import parse_spec
from ftsup.supervisor.trainer_logs import (
    LLAMAFACTORY_LOG,
    LlamaFactoryLog,
    TqdmReader,
    llamafactory_record,
    parse_bar,
    parse_elapsed,
    parse_log_dict,
)
from tests.supervisor_harness import Harness, wait_for

REPO = Path(__file__).resolve().parent.parent
LOG_WRITER = REPO / "tests" / "scripts" / "log_writer.py"

# Captured bytes (see the module docstring) -----------------------------------------
HF_RUN = (
    b"\r  0%|          | 0/12 [00:00<?, ?it/s]\r  8%|\xe2\x96\x8a         | 1/12 [00:00<00:01,  7."
    b"49it/s]\r 17%|\xe2\x96\x88\xe2\x96\x8b        | 2/12 [00:00<00:01,  7.88it/s]\r 25%|\xe2\x96"
    b"\x88\xe2\x96\x88\xe2\x96\x8c       | 3/12 [00:00<00:01,  8.01it/s]\r                        "
    b"                      \r{'loss': '4.001', 'grad_norm': '6.476', 'learning_rate': '0.008333',"
    b" 'epoch': '0.09375'}\n\r 25%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8c       | 3/12 [00:00<00:01,"
    b"  8.01it/s]\r 33%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8e      | 4/12 [00:00<00:00,"
    b"  8.05it/s]\r 42%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8f     | 5/12 [0"
    b"0:00<00:00,  8.10it/s]\r 50%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88   "
    b"  | 6/12 [00:00<00:00,  8.02it/s]\r                                              \r{'loss': "
    b"'3.96', 'grad_norm': '4.301', 'learning_rate': '0.005833', 'epoch': '0.1875'}\n\r 50%|\xe2"
    b"\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88     | 6/12 [00:00<00:00,  8.02it/s]"
    b"\n\r  0%|          | 0/5 [00:00<?, ?it/s]\x1b[A\n\r 40%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x88      | 2/5 [00:00<00:00, 16.49it/s]\x1b[A\n\r 80%|\xe2\x96\x88\xe2\x96\x88\xe2"
    b"\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88  | 4/5 [00:00<00:00, 10"
    b".38it/s]\x1b[A\r                                              \r\n\r                        "
    b"                     \r\x1b[A{'eval_loss': '2', 'eval_runtime': '0.6073', 'eval_samples_per_"
    b"second': '16.47', 'eval_steps_per_second': '8.233', 'epoch': '0.1875'}\n\r 50%|\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88     | 6/12 [00:01<00:00,  8.02it/s]\n\r100%"
    b"|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2"
    b"\x96\x88\xe2\x96\x88\xe2\x96\x88| 5/5 [00:00<00:00, 10.38it/s]\x1b[A\n\r                    "
    b"                         \x1b[A\r 58%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2"
    b"\x96\x88\xe2\x96\x8a    | 7/12 [00:01<00:01,  3.10it/s]\r 67%|\xe2\x96\x88\xe2\x96\x88\xe2"
    b"\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8b   | 8/12 [00:01<00:01,  3.86it/s]\r"
    b" 75%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x8c  | 9/12 [00:01<00:00,  4.63it/s]\r                                             "
    b" \r{'loss': '4.894', 'grad_norm': '6.429', 'learning_rate': '0.003333', 'epoch': '0.2812'}\n"
    b"\r 75%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x8c  | 9/12 [00:01<00:00,  4.63it/s]\r 83%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2"
    b"\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8e | 10/12 [00:01<00:00,  "
    b"5.33it/s]\r 92%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2"
    b"\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8f| 11/12 [00:01<00:00,  5.93it/s]\r100%|\xe2\x96"
    b"\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2"
    b"\x96\x88\xe2\x96\x88| 12/12 [00:02<00:00,  6.47it/s]\r                                      "
    b"         \r{'loss': '1.754', 'grad_norm': '1.702', 'learning_rate': '0.0008333', 'epoch': '0"
    b".375'}\n\r100%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2"
    b"\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88| 12/12 [00:02<00:00,  6.47it/s]\n\r  0%|       "
    b"   | 0/5 [00:00<?, ?it/s]\x1b[A\n\r 40%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88    "
    b"  | 2/5 [00:00<00:00, 16.52it/s]\x1b[A\n\r 80%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88  | 4/5 [00:00<00:00, 10.39it/s]\x1b[A\r"
    b"                                               \r\n\r                                       "
    b"      \r\x1b[A{'eval_loss': '1.958', 'eval_runtime': '0.6067', 'eval_samples_per_second': '1"
    b"6.48', 'eval_steps_per_second': '8.241', 'epoch': '0.375'}\n\r100%|\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88| 12/12 [00:02<00:00,  6.47it/s]\n\r100%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88| 5/5 [00:00<00:"
    b"00, 10.39it/s]\x1b[A\n\r                                             \x1b[A\r               "
    b"                                \r{'train_runtime': '2.708', 'train_samples_per_second': '8."
    b"861', 'train_steps_per_second': '4.431', 'train_loss': '3.652', 'epoch': '0.375'}\n\r100%|"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88\xe2\x96\x88\xe2\x96\x88| 12/12 [00:02<00:00,  6.47it/s]\r100%|\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88| 12/12 [00:02<00:00,  4.43it/s]\n"
)
HF_RESUMED_FROM_5 = (
    b"\r  0%|          | 0/12 [00:00<?, ?it/s]\r 50%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88\xe2\x96\x88     | 6/12 [00:00<00:00, 47.47it/s]\r                                      "
    b"        \r{'loss': '2.072', 'grad_norm': '4.301', 'learning_rate': '0.005833', 'epoch': '0.1"
    b"875'}\n\r 50%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88     | 6/12 [00:00"
    b"<00:00, 47.47it/s]\n\r  0%|          | 0/5 [00:00<?, ?it/s]\x1b[A\n\r 40%|\xe2\x96\x88\xe2"
    b"\x96\x88\xe2\x96\x88\xe2\x96\x88      | 2/5 [00:00<00:00, 16.48it/s]\x1b[A\n\r 80%|\xe2\x96"
    b"\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88  | "
    b"4/5 [00:00<00:00, 10.37it/s]\x1b[A\r                                              \r\n\r    "
    b"                                         \r\x1b[A{'eval_loss': '2', 'eval_runtime': '0.6079'"
    b", 'eval_samples_per_second': '16.45', 'eval_steps_per_second': '8.226', 'epoch': '0.1875'}\n"
    b"\r 50%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88     | 6/12 [00:00<00:00,"
    b" 47.47it/s]\n\r100%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88| 5/5 [00:00<00:00, 10.37it/s]\x1b[A\n\r    "
    b"                                         \x1b[A\r                                           "
    b"   \r{'loss': '4.894', 'grad_norm': '6.429', 'learning_rate': '0.003333', 'epoch': '0.2812'}"
    b"\n\r 75%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88\xe2\x96\x8c  | 9/12 [00:01<00:00, 47.47it/s]\r 92%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8f| 11/12 "
    b"[00:01<00:00,  7.01it/s]\r                                               \r{'loss': '1.754',"
    b" 'grad_norm': '1.702', 'learning_rate': '0.0008333', 'epoch': '0.375'}\n\r100%|\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88\xe2\x96\x88| 12/12 [00:01<00:00,  7.01it/s]\n\r  0%|          | 0/5 [00:00<?, ?it/s]"
    b"\x1b[A\n\r 40%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88      | 2/5 [00:00<00:00, 16."
    b"50it/s]\x1b[A\n\r 80%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88\xe2\x96\x88\xe2\x96\x88  | 4/5 [00:00<00:00, 10.38it/s]\x1b[A\r                        "
    b"                       \r\n\r                                             \r\x1b[A{'eval_los"
    b"s': '1.958', 'eval_runtime': '0.6068', 'eval_samples_per_second': '16.48', 'eval_steps_per_s"
    b"econd': '8.24', 'epoch': '0.375'}\n\r100%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88| 12/12 [00:02<00:00"
    b",  7.01it/s]\n\r100%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88| 5/5 [00:00<00:00, 10.38it/s]\x1b[A\n\r"
    b"                                             \x1b[A\r                                       "
    b"        \r{'train_runtime': '2.085', 'train_samples_per_second': '6.714', 'train_steps_per_s"
    b"econd': '3.357', 'train_loss': '3.145', 'epoch': '0.375'}\n\r100%|\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88| 12/12 [00:02<00:00,  7.01it/s]\r100%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88| 12/12 [00:02<00:00"
    b",  5.76it/s]\n"
)
DATASETS_MAP = (
    b"\rMap:   0%|          | 0/500 [00:00<?, ? examples/s]\rMap: 100%|\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96"
    b"\x88| 500/500 [00:00<00:00, 57063.81 examples/s]\n\rRunning tokenizer on dataset (num_proc=2"
    b"):   0%|          | 0/500 [00:00<?, ? examples/s]\rRunning tokenizer on dataset (num_proc=2)"
    b": 100%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88"
    b"\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88| 500/500 [00:00<00:00, 3871.45 examples/s]\n"
)


def _lines(data: bytes) -> list[str]:
    """As the daemon's log follower hands them over: split at newlines, \\r kept."""
    return [line.decode(errors="replace") for line in data.split(b"\n")]


def _steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["event"] == "step"]


# tqdm ---------------------------------------------------------------------------------
def test_hf_run_gives_every_drawn_step_once_with_the_loss_of_its_log_step() -> None:
    records = TqdmReader().feed(_lines(HF_RUN), now=1000.0)
    # Each drawn step once; a log step again with its loss (from the redraw after the
    # dict); the eval bars (0/5, 2/5, 4/5, 5/5) are not steps.
    assert _steps(records) == [1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12, 12]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert losses == {3: 4.001, 6: 3.96, 9: 4.894, 12: 1.754}
    step_3 = next(r for r in records if r["step"] == 3 and "loss" in r)
    assert step_3 == {
        "event": "step",
        "step": 3,
        "max_steps": 12,
        "loss": 4.001,
        "grad_norm": 6.476,
        "lr": 0.008333,
        "epoch": 0.09375,
        "ts": step_3["ts"],
    }
    evals = [(r["step"], r["eval_loss"]) for r in records if r["event"] == "eval"]
    assert evals == [(6, 2.0), (12, 1.958)]


def test_a_resumed_run_starts_at_its_checkpoint_never_at_zero() -> None:
    records = TqdmReader(expected_total=12).feed(_lines(HF_RESUMED_FROM_5), now=1000.0)
    # The bar is drawn at 0/12 first, then jumps to the resumed global step.
    assert _steps(records)[0] == 6 and 0 not in _steps(records)
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == {
        6: 2.072,
        9: 4.894,
        12: 1.754,
    }
    assert sorted(set(_steps(records))) == [6, 9, 11, 12]


def _command_follower(tmp_path: Path, started_at: float = 0.0) -> tuple[RunFollower, Path]:
    spec = parse_spec(
        f'[job]\nname = "j"\noutput_dir = "{tmp_path / "out"}"\n'
        '[command]\nargv = ["python", "train.py"]\n',
        tmp_path / "j.toml",
    )
    follower = RunFollower(spec, tmp_path / "progress.jsonl", lambda *_: None)
    attempt_dir = tmp_path / "attempt-1"
    attempt_dir.mkdir()
    follower.begin_attempt(attempt_dir, started_at=started_at, start_step=0, log_file="stdout.log")
    return follower, attempt_dir / "stdout.log"


def test_the_follower_reads_the_bar_before_its_line_ends(tmp_path: Path) -> None:
    follower, log = _command_follower(tmp_path)
    records, looked = [], False
    with log.open("ab") as handle:
        for start in range(0, len(HF_RUN), 40):  # arbitrary chunks, as a tail -f sees them
            handle.write(HF_RUN[start : start + 40])
            handle.flush()
            records += [r for r in follower.read().records if r["event"] == "step"]
            written = HF_RUN[: start + 40]
            if b"\n" not in written and b"| 3/12 [00:00<00:01,  8.01it/s]" in written:
                # Steps 1-3 are drawn, no newline yet: the step shows all the same.
                assert follower.progress.step == 3
                looked = True
    assert looked
    assert _steps(records) == _steps(TqdmReader().feed(_lines(HF_RUN), now=1.0))
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == {
        3: 4.001,
        6: 3.96,
        9: 4.894,
        12: 1.754,
    }
    assert follower.progress.step == 12 and follower.progress.eval_loss == 1.958


def test_trainer_log_jsonl_takes_over_from_the_bar_without_going_back(tmp_path: Path) -> None:
    follower, log = _command_follower(tmp_path)
    bars = "".join(
        f"\r{s * 10:3d}%|#         | {s}/10 [00:{s:02d}<00:10,  1.00it/s]" for s in range(8)
    )
    log.write_text(bars)
    shown = []

    def read() -> int:
        for record in follower.read().records:
            shown.append(record["step"])
        return follower.progress.step

    assert read() == 7  # the bar alone so far
    out = tmp_path / "out"
    out.mkdir()
    _append(
        out / LLAMAFACTORY_LOG, _train(5, "0:00:05", total=10) + _train(10, "0:00:10", total=10)
    )
    wait_for(lambda: read() == 10, 30, what="trainer_log.jsonl to be read")
    # trainer_log.jsonl's step 5 is behind what the bar showed: not shown again.
    assert shown == [1, 2, 3, 4, 5, 6, 7, 10]
    with log.open("a") as handle:  # the bar goes on, but trainer_log.jsonl is trusted first
        handle.write("\r 90%|#########  | 9/10 [00:09<00:01,  1.00it/s]\n")
    assert read() == 10


def test_a_stale_trainer_log_jsonl_neither_hides_the_bar_nor_steps_back(tmp_path: Path) -> None:
    follower, log = _command_follower(tmp_path, started_at=time.time())
    out = tmp_path / "out"
    out.mkdir()
    _append(out / LLAMAFACTORY_LOG, _train(100, "0:01:40") + _train(200, "0:03:20"), mtime=1000.0)
    bars = (f"\r{s:3d}%|#  | {s}/100 [00:{s:02d}<01:40,  1.00it/s]" for s in range(4))
    log.write_text("".join(bars))
    seen = [r["step"] for r in follower.read().records]  # and trainer_log.jsonl's read starts
    asyncio.run(follower.settle())  # every pending read of the output folder has answered
    seen += [r["step"] for r in follower.read().records]
    assert seen == [1, 2, 3] and follower.progress.step == 3


def test_times_come_from_the_bar_elapsed_before_the_moment_of_reading() -> None:
    reader = TqdmReader()
    records = reader.feed(_lines(HF_RUN), now=1000.0, anchor=990.0)
    times = [r["ts"] for r in records]
    assert times == sorted(times) and times[-1] == 990.0
    assert times[0] == 988.0  # step 1 drawn at 00:00, the last draw at 00:02
    later = reader.feed([" 50%|#####     | 6/12 [00:03<00:03,  2.00it/s]"], now=980.0)
    assert later == []  # an old count again: nothing, and never a time going back


def test_other_bars_are_not_the_training_bar() -> None:
    assert TqdmReader().feed(_lines(DATASETS_MAP), now=1.0) == []
    assert (
        parse_bar("Loading checkpoint shards: 100%|██████████| 2/2 [00:01<00:00,  1.50it/s]")
        is None
    )
    download = "model.safetensors: 100%|██████████| 988M/988M [00:08<00:00, 119MB/s]"
    assert parse_bar(download) is None
    assert parse_bar("123it [00:10, 12.30it/s]") is None  # no total: not a step count
    nested = parse_bar("  0%|          | 0/5 [00:00<?, ?it/s]\x1b[A")
    assert nested is not None and nested.nested
    slow = parse_bar(" 12%|█▏        | 123/1000 [10:00<1:11:20,  4.88s/it]")
    assert slow is not None and (slow.n, slow.total, slow.elapsed) == (123, 1000, 600.0)


def test_the_training_total_once_known_rules_out_other_bars() -> None:
    reader = TqdmReader(expected_total=1000)
    assert reader.feed([" 40%|####      | 2/5 [00:00<00:00,  9.00it/s]"], now=1.0) == []
    records = reader.feed([" 12%|█▏        | 123/1000 [00:10<01:20, 12.30it/s]"], now=2.0)
    assert _steps(records) == [123]
    locked = TqdmReader()  # no total known: the first training-like bar sets it
    locked.feed(["  1%|          | 10/1000 [00:01<01:40,  9.90it/s]"], now=1.0)
    assert locked.feed([" 60%|######    | 30/50 [00:03<00:02,  9.90it/s]"], now=2.0) == []


def test_log_dicts_of_transformers_4_and_5() -> None:
    v5 = "{'loss': '2.895', 'grad_norm': '4.932', 'learning_rate': '0.008333', 'epoch': '0.09375'}"
    assert parse_log_dict(v5) == {
        "loss": 2.895,
        "grad_norm": 4.932,
        "learning_rate": 0.008333,
        "epoch": 0.09375,
    }
    v4 = "{'loss': nan, 'grad_norm': inf, 'learning_rate': 5e-05, 'epoch': 0.5}"
    parsed = parse_log_dict(v4)
    assert parsed is not None and math.isnan(parsed["loss"]) and parsed["learning_rate"] == 5e-05
    summary = (
        "{'train_runtime': '2.708', 'train_samples_per_second': '8.861', 'train_loss': '3.652'}"
    )
    assert parse_log_dict(summary) is None
    assert parse_log_dict("{'eval_loss': '2', 'eval_runtime': '0.6073'}") == {
        "eval_loss": 2.0,
        "eval_runtime": 0.6073,
    }


def test_elapsed_times() -> None:
    assert parse_elapsed("00:10") == 10.0
    assert parse_elapsed("1:11:20") == 4280.0
    assert parse_elapsed("0:01:02") == 62.0  # str(timedelta), LLaMA-Factory
    assert parse_elapsed("2 days, 1:00:00") == 49 * 3600.0
    assert parse_elapsed("?") is None and parse_elapsed(None) is None


# LLaMA-Factory's trainer_log.jsonl ---------------------------------------------------
def _lf_line(step: int, total: int, elapsed: str, **extra: object) -> str:
    line = {
        "current_steps": step,
        "total_steps": total,
        **extra,
        "percentage": round(step / total * 100, 2),
        "elapsed_time": elapsed,
        "remaining_time": "0:00:10",
    }
    return json.dumps(line) + "\n"


def _train(step: int, elapsed: str, total: int = 100) -> str:
    return _lf_line(step, total, elapsed, loss=10.0 / step, lr=1e-4, epoch=step / 50)


def _append(path: Path, text: str, mtime: float | None = None) -> None:
    with path.open("a") as handle:
        handle.write(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_llamafactory_lines_become_records_timed_by_their_elapsed_time(tmp_path: Path) -> None:
    log = tmp_path / LLAMAFACTORY_LOG
    _append(log, _train(5, "0:00:05") + _train(10, "0:00:10"), mtime=1000.0)
    reader = LlamaFactoryLog(tmp_path)
    records = reader.read(now=2000.0)
    assert records == [
        {
            "event": "step",
            "step": 5,
            "max_steps": 100,
            "loss": 2.0,
            "lr": 1e-4,
            "epoch": 0.1,
            "ts": 995.0,
        },
        {
            "event": "step",
            "step": 10,
            "max_steps": 100,
            "loss": 1.0,
            "lr": 1e-4,
            "epoch": 0.2,
            "ts": 1000.0,
        },
    ]
    _append(
        log,
        _lf_line(10, 100, "0:00:11", eval_loss=0.9, epoch=0.2) + '{"current_steps": 1',
        mtime=1001.0,
    )
    assert reader.read(now=2000.0) == [
        {"event": "eval", "step": 10, "eval_loss": 0.9, "ts": 1001.0}
    ]
    _append(log, ', "total_steps": 100}\n', mtime=1002.0)  # a prediction-only progress line
    assert reader.read(now=2000.0) == []


def test_a_resumed_run_counts_its_recomputed_steps_once(tmp_path: Path) -> None:
    log = tmp_path / LLAMAFACTORY_LOG
    _append(log, "".join(_train(s, f"0:00:{s:02d}") for s in (5, 10, 15)), mtime=1015.0)
    reader = LlamaFactoryLog(tmp_path)
    assert _steps(reader.read(now=5000.0)) == [5, 10, 15]
    # The trainer crashed after 15 and resumed from checkpoint-10: a new process
    # appends from step 11 on, its elapsed time starting again.
    _append(log, _train(15, "0:00:03") + _train(20, "0:00:08"), mtime=1108.0)
    records = reader.read(now=5000.0)
    assert _steps(records) == [15, 20]  # 15 ran twice: reported again, as the new run's
    assert [r["ts"] for r in records] == [1103.0, 1108.0]
    assert reader.read(now=5000.0) == []


def test_on_a_first_read_only_the_newest_run_counts(tmp_path: Path) -> None:
    log = tmp_path / LLAMAFACTORY_LOG
    first = "".join(_train(s, f"0:00:{s:02d}") for s in (5, 10, 15))
    second = "".join(_train(s, f"0:00:{s - 10:02d}") for s in (15, 20))
    _append(log, first + second, mtime=3000.0)
    records = LlamaFactoryLog(tmp_path).read(now=5000.0)
    assert _steps(records) == [15, 20]
    assert [r["ts"] for r in records] == [2995.0, 3000.0]


def test_a_file_larger_than_one_read_still_counts_only_its_newest_run(tmp_path: Path) -> None:
    def clock(seconds: int) -> str:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    old = "".join(_train(s, clock(s), total=40_000) for s in range(1, 20_001))
    new = "".join(_train(s, clock(s - 18_000), total=40_000) for s in range(18_001, 30_001))
    log = tmp_path / LLAMAFACTORY_LOG
    _append(log, old + new, mtime=100_000.0)
    assert log.stat().st_size > 4 << 20  # more than one read takes
    reader, records = LlamaFactoryLog(tmp_path), []
    for _ in range(5):
        records += reader.read(now=200_000.0)
    assert _steps(records) == list(range(18_001, 30_001))
    assert records[-1]["ts"] == 100_000.0 and records[0]["ts"] == 100_000.0 - 11_999


def test_a_rewritten_file_never_counts_a_line_twice(tmp_path: Path) -> None:
    log = tmp_path / LLAMAFACTORY_LOG
    text = "".join(_train(s, f"0:00:{s:02d}") for s in (5, 10))
    _append(log, text, mtime=1000.0)
    reader = LlamaFactoryLog(tmp_path)
    assert _steps(reader.read(now=2000.0)) == [5, 10]
    replaced = tmp_path / "copy"
    replaced.write_text(text)  # same lines, new file (an editor, rsync, a copy back)
    replaced.replace(log)
    assert reader.read(now=2000.0) == []
    # A fresh run (LLaMA-Factory deletes the file with overwrite_output_dir): new lines.
    log.unlink()
    _append(log, _train(5, "0:00:04"), mtime=1500.0)
    assert _steps(reader.read(now=2000.0)) == [5]


def test_what_is_not_a_regular_file_reads_as_nothing(tmp_path: Path) -> None:
    log = tmp_path / LLAMAFACTORY_LOG
    os.mkfifo(log)  # an open() without O_NONBLOCK would wait for a writer for ever
    assert LlamaFactoryLog(tmp_path).read(now=1.0) == []
    log.unlink()
    target = tmp_path / "elsewhere.jsonl"
    target.write_text(_train(5, "0:00:05"))
    log.symlink_to(target)
    assert LlamaFactoryLog(tmp_path).read(now=1.0) == []
    assert LlamaFactoryLog(tmp_path / "missing").read(now=1.0) == []


def test_llamafactory_record_keeps_only_training_lines() -> None:
    assert llamafactory_record({"current_steps": 5, "total_steps": 10, "percentage": 50.0}) is None
    assert llamafactory_record({"current_steps": True, "loss": 1.0}) is None
    assert llamafactory_record({"current_steps": 7, "epoch": 1.0, "total_steps": 7}) == {
        "event": "step",
        "step": 7,
        "max_steps": 7,
        "epoch": 1.0,
    }
    with_tokens = llamafactory_record({"current_steps": 2, "loss": 1.5, "throughput": 812.5})
    assert with_tokens is not None and with_tokens["tokens_per_s"] == 812.5


# under a real daemon ------------------------------------------------------------------
def _writer_job(daemon: Harness, name: str, mode: str, release: Path) -> Path:
    output_dir = daemon.work / name
    argv = [
        sys.executable,
        str(LOG_WRITER),
        "--output-dir",
        str(output_dir),
        "--mode",
        mode,
        "--max-steps",
        "20",
        "--save-steps",
        "20",
        "--logging-steps",
        "5",
        # Log steps a second or more apart: their 1 s elapsed times tell them apart.
        "--step-time",
        "0.25",
        "--hold-at",
        "15",
        "--release",
        str(release),
    ]
    path = daemon.work / f"{name}.toml"
    path.write_text(
        f'[job]\nname = "{name}"\noutput_dir = "{output_dir}"\n\n'
        f"[command]\nargv = {json.dumps(argv)}\n"
        'resume_args = ["--resume_from_checkpoint", "{checkpoint}"]\n'
    )
    return path


def _live_between_saves(daemon: Harness, mode: str) -> dict:
    name, release = f"live-{mode}", daemon.work / f"release-{mode}"
    daemon.cli("start", str(_writer_job(daemon, name, mode, release)))
    status = wait_for(
        lambda: (s := daemon.status(name))["progress"]["step"] == 15 and s,
        60,
        what="step 15 in ftsup status",
    )
    # Held after step 15, before any save (every 20 steps): only the logs tell.
    assert not list((daemon.work / name).glob("checkpoint-*"))
    assert status["progress"]["last_checkpoint_step"] is None
    assert status["progress"]["max_steps"] == 20
    goodput = status["goodput"]
    assert goodput["unknown"] is None and goodput["productive_s"] > 0
    release.touch()
    done = daemon.wait_state(name, "finished", "gave_up", "failed")
    assert done["state"] == "finished" and done["progress"]["step"] == 20
    return dict(status)


def test_tqdm_output_shows_live_steps_between_saves(daemon: Harness) -> None:
    status = _live_between_saves(daemon, "tqdm")
    assert status["progress"]["loss"] == 0.6667  # 10/15 as HF prints it (4 digits)
    assert status["progress"]["steps_per_s"] is not None


def test_trainer_log_jsonl_shows_live_steps_between_saves(daemon: Harness) -> None:
    status = _live_between_saves(daemon, "llamafactory")
    assert status["progress"]["loss"] == 10.0 / 15


def test_steps_known_only_from_checkpoints_give_unknown_goodput_not_zero(daemon: Harness) -> None:
    job = daemon.toy_job("untimed", "--max-steps", "10", "--save-steps", "5", "--no-progress")
    daemon.cli("start", str(job))
    status = daemon.wait_state("untimed", "finished", "gave_up", "failed")
    assert status["state"] == "finished" and status["progress"]["step"] == 10
    goodput = status["goodput"]
    assert goodput["goodput"] is None and goodput["productive_s"] is None
    assert "without times" in goodput["unknown"]
