"""Pristine checkpoints built once per session; each test damages its own copy."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from . import builders

Factory = Callable[[str], Path]


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Output folders with checkpoint-2, -4, -6 in each layout, never modified."""
    root = tmp_path_factory.mktemp("pristine")
    hf = root / "hf"
    builders.train(hf)
    variants = {"hf": hf}
    for name, change in (
        ("hf2", builders.make_two_rank),
        ("ftsup", builders.add_manifests),
        ("sharded", builders.make_sharded),
        ("weights_only", builders.strip_training_state),
        ("hf_deepspeed", builders.make_hf_deepspeed),
    ):
        shutil.copytree(hf, root / name)
        change(root / name)
        variants[name] = root / name
    shutil.copytree(root / "hf2", root / "ftsup2")
    builders.add_manifests(root / "ftsup2", world_size=2)
    variants["ftsup2"] = root / "ftsup2"
    (root / "deepspeed").mkdir()
    builders.make_deepspeed(root / "deepspeed")
    variants["deepspeed"] = root / "deepspeed"
    return variants


@pytest.fixture
def output_dir(pristine: dict[str, Path], tmp_path: Path) -> Factory:
    """`output_dir("hf")`: a fresh copy of a pristine output folder to damage."""

    def copy(kind: str) -> Path:
        target = tmp_path / kind
        shutil.copytree(pristine[kind], target)
        return target

    return copy
