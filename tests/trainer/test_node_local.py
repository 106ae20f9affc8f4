"""Node-local checkpoint folders (`[train] save_on_each_node`, issue 17).

Each node of a multi-node job writes its own copy of every checkpoint into its
own folder (the same path on each node's disk): the model and optimizer from
the node's first process, and only its own ranks' `rng_state_<rank>.pth`. The
copy's manifest names those ranks (`ranks`), and every validation (the
trainer's agreement, the daemon's watcher and resume choice, run with the job's
full world size) expects exactly their files.

The end-to-end test: two daemons stand in for two nodes (as in test_multinode),
with two output folders. The second node's trainer dies while sealing
checkpoint 4, so only the first node holds a sealed 4: both nodes resume 2,
each from its own folder, and both folders end with sealed copies of the same
weights, equal to the same job run as two processes on one node.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.checkpoints.discovery import resumable_steps, select_resume
from ftsup.supervisor.checkpoints.validate import validate_checkpoint
from ftsup.supervisor.contract import ENV_FAULT_AT_STEP, ENV_FAULT_ONCE_FILE, ENV_FAULT_POINT
from ftsup.supervisor.manifest import read_manifest
from ftsup.supervisor.spec import SpecError, parse_spec
from tests.supervisor_harness import Harness
from tests.trainer.test_nodes_agreement import node_copy
from tests.trainer.trainer_helpers import node_job_text

pytestmark = pytest.mark.slow  # trains real models: starts first (tests/conftest.py)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ----------------------------------------------------------- validation of a copy


def test_a_copy_with_its_ranks_rng_files_is_valid_at_the_jobs_world_size(tmp_path: Path) -> None:
    ckpt = node_copy(tmp_path, 4, (1,))
    assert read_manifest(ckpt).ranks == (1,)
    report = validate_checkpoint(ckpt, world_size=2, require_manifest=True)
    assert report.valid and report.resumable, report.reason
    assert report.details["world_size"] == 2


def test_a_copy_missing_one_of_its_ranks_files_is_invalid(tmp_path: Path) -> None:
    """Sealed for ranks 2 and 3, but rank 3 never wrote its RNG file."""
    from ftsup.supervisor.manifest import build_manifest, write_manifest

    ckpt = node_copy(tmp_path, 4, (2,), seal=False)
    manifest = build_manifest(
        ckpt, step=4, world_size=4, fingerprint={}, created_at=0.0, ranks=(2, 3)
    )
    write_manifest(ckpt, manifest)
    report = validate_checkpoint(ckpt, world_size=4, require_manifest=True)
    assert not report.valid
    assert report.reason == "rng_state_3.pth missing (this copy holds ranks 2, 3)"
    assert validate_checkpoint(node_copy(tmp_path / "b", 4, (2, 3), world_size=4)).resumable


def test_a_manifest_without_ranks_still_expects_every_ranks_file(tmp_path: Path) -> None:
    """Old manifests (and shared folders): no `ranks` key, every rank's file."""
    from ftsup.supervisor.manifest import build_manifest, write_manifest

    ckpt = node_copy(tmp_path, 4, (1,), seal=False)
    manifest = build_manifest(ckpt, step=4, world_size=2, fingerprint={}, created_at=0.0)
    write_manifest(ckpt, manifest)
    assert "ranks" not in json.loads((ckpt / "ftsup-manifest.json").read_text())
    assert read_manifest(ckpt).ranks is None
    report = validate_checkpoint(ckpt, world_size=2, require_manifest=True)
    assert not report.valid and report.reason == "rng_state_0.pth missing (world size 2)"


def test_an_hf_only_copy_is_judged_by_the_ranks_the_caller_names(tmp_path: Path) -> None:
    ckpt = node_copy(tmp_path, 4, (1,), seal=False)
    assert validate_checkpoint(ckpt, world_size=2, ranks=(1,)).resumable
    assert not validate_checkpoint(ckpt, world_size=2).valid
    assert not validate_checkpoint(ckpt, world_size=2, ranks=(0,)).valid


def test_a_nodes_resumable_steps_and_the_daemons_choice(tmp_path: Path) -> None:
    """Node 1's folder: 2 and 4 sealed, 6 never sealed. The daemon's selection (the
    job's full world size, no quarantine on a multi-node job) takes 4; the node's
    own listing quarantines 6 and lists 4 and 2."""
    for step in (2, 4):
        node_copy(tmp_path, step, (1,))
    node_copy(tmp_path, 6, (1,), seal=False)
    daemon = select_resume(tmp_path, world_size=2, require_manifest=True, quarantine=False)
    assert daemon.step == 4 and (tmp_path / "checkpoint-6").is_dir()
    steps, choice = resumable_steps(tmp_path, world_size=2, require_manifest=True, ranks=(1,))
    assert steps == [4, 2]
    assert [q.report.path.name for q in choice.quarantined] == ["checkpoint-6"]
    assert not (tmp_path / "checkpoint-6").exists()


# ------------------------------------------------------------------ the job file

_JOB = """
[job]
name = "x"
output_dir = "/tmp/out"
[train]
model = "m"
dataset = ["d.jsonl"]
save_on_each_node = {value}
[launch]
nnodes = 2
rdzv_endpoint = "h:1"
{launch}
"""


def test_the_job_file_carries_save_on_each_node(tmp_path: Path) -> None:
    spec = parse_spec(_JOB.format(value="true", launch=""), tmp_path / "j.toml")
    assert spec.train is not None and spec.train.save_on_each_node
    plain = parse_spec(_JOB.format(value="false", launch=""), tmp_path / "j.toml")
    assert plain.train is not None and not plain.train.save_on_each_node


@pytest.mark.parametrize(
    ("launch", "word"),
    [("min_nodes = 1", "min_nodes"), ('fsdp = "full_shard"', "fsdp")],
)
def test_save_on_each_node_is_refused_where_no_node_holds_a_whole_copy(
    tmp_path: Path, launch: str, word: str
) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(_JOB.format(value="true", launch=launch), tmp_path / "j.toml")
    (issue,) = [i for i in caught.value.issues if i.key == "train.save_on_each_node"]
    assert f"[launch] {word}" in issue.message


# ------------------------------------------------------------- two nodes, end to end

MAX_STEPS = 6
JOB = "nl"
ENDED = ("finished", "failed", "gave_up", "stopped")


def job_text(name: str, model: Path, data: Path, out: Path, launch: str) -> str:
    return node_job_text(
        name, model, data, out, launch, max_steps=MAX_STEPS, train_extra="save_on_each_node = true"
    )


@dataclass
class Run:
    nodes: tuple[Harness, Harness]
    folders: tuple[Path, Path]
    statuses: list[dict[str, Any]]
    reference: Path


@pytest.fixture(scope="module")
def run(tiny_model: Path, arith_data: Path) -> Iterator[Run]:
    first, second = Harness(), Harness()
    try:
        folders = (first.work / "out", second.work / "out")  # each node's own disk
        for node in (first, second):
            node.env["OMP_NUM_THREADS"] = "1"  # as torchrun sets for the reference
        # The second node's first process dies sealing checkpoint 4: its copy
        # has every file but no manifest; the first node's copy is sealed.
        second.env[ENV_FAULT_AT_STEP] = "4"
        second.env[ENV_FAULT_POINT] = "before_manifest"
        second.env[ENV_FAULT_ONCE_FILE] = str(second.work / "fault-fired")
        launch = f'nproc_per_node = 1\nnnodes = 2\nrdzv_endpoint = "127.0.0.1:{free_port()}"'
        for node, folder in zip((first, second), folders, strict=True):
            node.start_daemon()
            path = node.work / "nl.toml"  # the files differ only in output_dir
            path.write_text(job_text(JOB, tiny_model, arith_data, folder, launch))
            node.cli("start", str(path))
        statuses = [node.wait_state(JOB, *ENDED, timeout=300) for node in (first, second)]
        reference = first.work / "reference-out"
        path = first.work / "reference.toml"
        text = job_text("ref", tiny_model, arith_data, reference, "nproc_per_node = 2")
        path.write_text(text.replace("save_on_each_node = true", ""))
        first.cli("start", str(path))
        assert first.wait_state("ref", *ENDED, timeout=300)["state"] == "finished"
        yield Run((first, second), folders, statuses, reference)
    finally:
        for node in (first, second):
            node.cleanup()


def test_both_nodes_resume_the_newest_step_both_hold_each_from_its_own_folder(run: Run) -> None:
    assert [s["state"] for s in run.statuses] == ["finished", "finished"], run.statuses
    assert (run.nodes[1].work / "fault-fired").exists()
    for node, folder in zip(run.nodes, run.folders, strict=True):
        starts = [r for r in node.progress_lines(JOB) if r.get("event") == "train_start"]
        assert [(s["step"], s["resumed_from"]) for s in starts] == [
            (0, None),
            (2, str(folder / "checkpoint-2")),  # not 4: the second node has no sealed 4
        ], starts
        # The abandoned copies of 4 were moved aside (retired or quarantined), and
        # 4 was written again by the resumed run.
        assert any(p.name.startswith("checkpoint-4.") for p in folder.iterdir()), list(
            folder.iterdir()
        )


def test_both_folders_hold_sealed_copies_of_the_same_weights(run: Run) -> None:
    import torch
    from safetensors.torch import load_file

    held = []
    for folder in run.folders:
        for step in range(2, MAX_STEPS + 1, 2):
            report = validate_checkpoint(
                folder / f"checkpoint-{step}", world_size=2, require_manifest=True
            )
            assert report.valid and report.resumable, report.reason
        held.append(read_manifest(folder / f"checkpoint-{MAX_STEPS}").ranks)
    assert sorted(held) == [(0,), (1,)], held  # each node holds its own rank's RNG file
    name = f"checkpoint-{MAX_STEPS}/adapter_model.safetensors"
    copies = [load_file(str(folder / name)) for folder in (*run.folders, run.reference)]
    for other in copies[1:]:
        assert sorted(other) == sorted(copies[0])
        assert all(torch.equal(copies[0][key], other[key]) for key in other)


def test_each_daemon_accepts_its_nodes_copies(run: Run) -> None:
    """The daemons judge with the job's world size (2): the copies of the last
    step, holding one rank's RNG file each, are recorded valid on both nodes."""
    for node in run.nodes:
        events = node.cli_json("events", JOB)["events"]
        verdicts = [e["message"] for e in events if e["kind"] == "checkpoint"]
        assert f"checkpoint-{MAX_STEPS} valid" in verdicts, verdicts
