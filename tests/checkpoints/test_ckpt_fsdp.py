"""DCP folders written by torch.distributed.checkpoint itself (two gloo processes, FSDP2),
checked by `supervisor/checkpoints/fsdp.py` without torch: intact, then damaged."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from ftsup.supervisor.checkpoints.findings import Findings
from ftsup.supervisor.checkpoints.fsdp import check_dcp_folder
from tests.supervisor_harness import run_in_group

WRITER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Linear(64, 4))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=sys.argv[1])
    dist.barrier()  # no rank tears gloo down while another still talks (SIGABRT at exit)
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dcp")
    script = base / "writer.py"
    script.write_text(WRITER)
    target = base / "pristine"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code, output = run_in_group([*argv, str(script), str(target)], env, timeout=120)
    assert code == 0, output
    return target


@pytest.fixture
def dcp_dir(written: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(written, tmp_path / "ckpt"))


def problems(folder: Path, world_size: int | None = None) -> list[str]:
    found = Findings()
    check_dcp_folder(folder, found, label="ckpt", world_size=world_size)
    return found.problems


def test_real_dcp_output_is_complete(dcp_dir: Path) -> None:
    assert sorted(p.name for p in dcp_dir.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    found = Findings()
    assert check_dcp_folder(dcp_dir, found, label="ckpt", world_size=2) == {0, 1}
    assert found.ok and not found.notes, found


def test_truncated_rank_shard(dcp_dir: Path) -> None:
    shard = dcp_dir / "__1_0.distcp"
    size = shard.stat().st_size
    with shard.open("r+b") as handle:
        handle.truncate(size - 1)  # one byte short is enough
    assert problems(dcp_dir) == [
        f"ckpt/__1_0.distcp truncated: {size - 1} bytes, .metadata needs at least {size}"
    ]


def test_missing_rank_shard_without_world_size(dcp_dir: Path) -> None:
    (dcp_dir / "__0_0.distcp").unlink()
    assert problems(dcp_dir) == ["ckpt/__0_0.distcp missing (named by .metadata)"]


def test_missing_metadata_with_world_size(dcp_dir: Path) -> None:
    (dcp_dir / ".metadata").unlink()
    (dcp_dir / "__1_0.distcp").unlink()
    assert problems(dcp_dir, world_size=2) == [
        "ckpt/.metadata missing (distributed checkpoint incomplete)",
        "ckpt/__1_0.distcp missing (rank 1 wrote no shard)",
    ]


def test_truncated_metadata_is_unreadable(dcp_dir: Path) -> None:
    metadata = dcp_dir / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    assert [p.split(" (")[0] for p in problems(dcp_dir)] == ["ckpt/.metadata unreadable"]
