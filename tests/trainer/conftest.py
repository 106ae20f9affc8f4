"""Fixtures for the built-in trainer: a tiny offline model, data, trainer processes.

Every process a test starts is SIGKILLed (whole process group) at teardown,
pass or fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ftsup.trainer.tiny import build_arithmetic_dataset, build_tiny_model
from tests.trainer.trainer_helpers import TrainerProcess


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden=32)


@pytest.fixture(scope="session")
def arith_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_arithmetic_dataset(tmp_path_factory.mktemp("data") / "arith.jsonl", 24, seed=1)


@pytest.fixture
def start_trainer() -> Iterator[Callable[..., TrainerProcess]]:
    """Start trainer processes; all of them are killed (whole group) at teardown."""
    started: list[TrainerProcess] = []

    def start(config: Path, **kwargs: Any) -> TrainerProcess:
        process = TrainerProcess(config, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill_group()
        process._log.close()
