"""A one-process node of a multi-node job that runs alone (`min_nodes`) resumes the
shared folder's newest valid checkpoint, as rank 0 would, not its own daemon's
older choice (trainer/nodes.py). Seen in CI (session 13): with `min_nodes = 1` two
nodes ran alone in turn; the second started from scratch on its daemon's word,
trained the first node's steps again and retired its newer checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ftsup.supervisor.contract import ENV_NODES
from ftsup.supervisor.daemon.launcher import plan_attempt
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.spec import parse_spec
from ftsup.trainer import nodes
from ftsup.trainer.checkpointing import Checkpointer


def sealed_checkpoint(out: Path, step: int) -> Path:
    """A small resumable checkpoint: real safetensors and torch files (weights,
    optimizer, scheduler, RNG), the trainer state, the manifest."""
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.full((4,), float(step))}, str(folder / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"step": step}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    Checkpointer(out, fingerprint={"seed": 1}).finalize(folder, step, time.monotonic())
    return folder


@pytest.fixture
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process, on its own: torchrun's environment for a world of one."""
    for name, value in {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv(ENV_NODES, raising=False)


@pytest.mark.usefixtures("alone")
def test_a_lone_node_of_a_multi_node_job_resumes_the_shared_folders_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    older, newer = sealed_checkpoint(tmp_path, 2), sealed_checkpoint(tmp_path, 4)
    monkeypatch.setenv(ENV_NODES, "2")
    # Its daemon said "from scratch" (its first attempt) or an older checkpoint.
    assert nodes.agree_on_resume(None, tmp_path, 5) == newer
    assert nodes.agree_on_resume(older, tmp_path, 5) == newer
    assert older.is_dir() and newer.is_dir()  # nothing retired or quarantined


@pytest.mark.usefixtures("alone")
def test_a_single_node_job_keeps_its_daemons_choice(tmp_path: Path) -> None:
    older = sealed_checkpoint(tmp_path, 2)
    sealed_checkpoint(tmp_path, 4)
    assert nodes.agree_on_resume(older, tmp_path, 5) == older
    assert nodes.agree_on_resume(None, tmp_path, 5) is None


@pytest.mark.parametrize(
    ("launch", "expected"),
    [
        ('nnodes = 2\nmin_nodes = 1\nrdzv_endpoint = "n1:29400"', "2"),
        ('nnodes = 3\nrdzv_endpoint = "n1:29400"', "3"),
        ("nproc_per_node = 2", None),
    ],
    ids=["min-nodes", "fixed-nodes", "one-node"],
)
def test_the_daemon_tells_each_node_how_many_nodes_the_job_spans(
    tmp_path: Path, launch: str, expected: str | None
) -> None:
    text = (
        f'[job]\nname = "j"\noutput_dir = "out"\n[train]\nmodel = "m"\ndataset = "d.jsonl"\n'
        f"[launch]\n{launch}\n"
    )
    spec = parse_spec(text, tmp_path / "job.toml")
    layout = Layout(tmp_path / "state", tmp_path / "run")
    plan = plan_attempt(spec, layout, attempt=1, resume_from=None, base_env={})
    assert plan.env.get(ENV_NODES) == expected
