"""`FTSUP_SKIP_STEPS`: the data of rolled-back steps is consumed but not learned from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ftsup.trainer.skipping import in_windows, parse_skip_windows
from tests.trainer.trainer_helpers import TrainerProcess, write_config


def test_parse_skip_windows() -> None:
    assert parse_skip_windows("101-110, 205-205") == ((101, 110), (205, 205))
    assert parse_skip_windows("") == () and parse_skip_windows(None) == ()
    assert in_windows(105, ((101, 110),)) and not in_windows(111, ((101, 110),))
    for bad in ("7", "5-3", "0-2", "a-b"):
        with pytest.raises(ValueError, match="FTSUP_SKIP_STEPS"):
            parse_skip_windows(bad)


@pytest.mark.slow
def test_skipped_steps_leave_the_weights_alone(
    tiny_model: Path,
    arith_data: Path,
    tmp_path: Path,
    start_trainer: Callable[..., TrainerProcess],
) -> None:
    table = {
        "model": str(tiny_model),
        "dataset": [str(arith_data)],
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 5e-3,
        "max_steps": 6,
        "save_steps": 2,
        "save_total_limit": 5,
    }
    config = write_config(tmp_path / "run", table)
    process = start_trainer(config, env={"FTSUP_SKIP_STEPS": "3-4"})
    assert process.wait() == 0, process.log()
    out = config.parent / "out"

    def adapter(step: int) -> bytes:
        return (out / f"checkpoint-{step}" / "adapter_model.safetensors").read_bytes()

    assert adapter(4) == adapter(2), "a skipped step changed the weights"
    assert adapter(6) != adapter(4), "training did not go on after the window"
    steps = {e["step"]: e for e in process.events() if e["event"] == "step"}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert steps[3]["skipped"] and steps[3]["loss"] is None and steps[4]["skipped"]
    assert "skipped" not in steps[5] and isinstance(steps[5]["loss"], float)


def test_bad_skip_env_is_a_configuration_error(
    tiny_model: Path, arith_data: Path, tmp_path: Path, start_trainer: Callable[..., TrainerProcess]
) -> None:
    table = {"model": str(tiny_model), "dataset": [str(arith_data)], "max_steps": 2}
    process = start_trainer(write_config(tmp_path, table), env={"FTSUP_SKIP_STEPS": "9-3"})
    assert process.wait() == 2
    assert "FTSUP_SKIP_STEPS" in process.log()
