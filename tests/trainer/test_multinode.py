"""A multi-node job (issue 17): two daemons on one machine stand in for two nodes.

Each "node" is a daemon with its own state and runtime folders; both are given
the same job file (`[launch] nnodes = 2`, one process each, c10d rendezvous on
127.0.0.1, gloo) and write one shared output folder. The second node's trainer
is SIGKILLed once, when step 5 ends (after checkpoint 4 was sealed). Both
nodes' attempts end (the first node's rank sees its peer vanish), both daemons
restart their launchers, and both resume from checkpoint 4, the one rank 0
chose and published in the rendezvous store. The run must end with the LoRA
weights of the same job run as two processes on one node (the reference, a
third job on the first daemon), bit for bit, and with the same loss at every
step. The nodes' rank order comes from the rendezvous and may differ between
attempts; the gradient all-reduce gives the same sum either way.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor import outlock
from ftsup.supervisor.client import Client
from ftsup.supervisor.contract import ENV_FAULT_AT_STEP, ENV_FAULT_ONCE_FILE
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.spec_types import LaunchSection
from tests.supervisor_harness import Harness
from tests.trainer.trainer_helpers import TrainerProcess

MAX_STEPS = 8
JOB = "mn"
ENDED = ("finished", "failed", "gave_up", "stopped")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def job_text(name: str, model: Path, data: Path, out: Path, launch: str) -> str:
    return f"""
[job]
name = "{name}"
output_dir = "{out}"

[train]
model = "{model}"
dataset = ["{data}"]
cutoff_len = 64
lora_rank = 4
lora_dropout = 0.0
per_device_train_batch_size = 2
learning_rate = 5e-3
warmup_steps = 1
max_steps = {MAX_STEPS}
save_steps = 2
save_total_limit = 5
seed = 5

[checkpoint]
async_save = false

[restart]
backoff = "0.5s"

[launch]
{launch}
"""


def history(daemon: Harness, job: str) -> list[dict[str, Any]]:
    """Every progress line of the job the daemon recorded, all attempts."""
    layout = Layout.from_env(daemon.state_dir, daemon.runtime_dir)
    with Client(layout.socket) as client:
        answer = client.request("progress_history", job=job, limit=5000)
    return list(answer["records"])


def losses(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [
        (r["step"], r["loss"])
        for r in records
        if r.get("event") == "step" and r.get("loss") is not None
    ]


@dataclass
class Nodes:
    first: Harness
    second: Harness
    shared: Path  # the job's output folder
    reference: Path
    statuses: list[dict[str, Any]]  # each node's final status


@pytest.fixture(scope="module")
def nodes(tiny_model: Path, arith_data: Path) -> Iterator[Nodes]:
    first, second = Harness(), Harness()
    try:
        shared = first.work / "shared-out"
        for node in (first, second):
            # One thread per process, as torchrun sets for the two-process reference:
            # with one process per node it leaves the default (all cores), and a
            # matmul summed in another order differs in the last bits.
            node.env["OMP_NUM_THREADS"] = "1"
        second.env[ENV_FAULT_AT_STEP] = "5"  # this node's trainer only, once
        second.env[ENV_FAULT_ONCE_FILE] = str(second.work / "fault-fired")
        launch = (
            "nproc_per_node = 1\nnnodes = 2\n"
            f'rdzv_endpoint = "127.0.0.1:{free_port()}"\nrdzv_backend = "c10d"'
        )
        text = job_text(JOB, tiny_model, arith_data, shared, launch)
        for node in (first, second):
            node.start_daemon()
            path = node.work / "mn.toml"
            path.write_text(text)
            node.cli("start", str(path))
        statuses = [node.wait_state(JOB, *ENDED, timeout=600) for node in (first, second)]

        reference = first.work / "reference-out"
        path = first.work / "reference.toml"
        path.write_text(job_text("ref", tiny_model, arith_data, reference, "nproc_per_node = 2"))
        first.cli("start", str(path))
        assert first.wait_state("ref", *ENDED, timeout=600)["state"] == "finished"
        yield Nodes(first, second, shared, reference, statuses)
    finally:
        for node in (first, second):
            node.cleanup()


def test_both_nodes_finish_after_one_nodes_trainer_was_killed(nodes: Nodes) -> None:
    assert [s["state"] for s in nodes.statuses] == ["finished", "finished"], nodes.statuses
    assert (nodes.second.work / "fault-fired").exists()
    for node in (nodes.first, nodes.second):
        attempts = node.status(JOB)["attempt_history"]
        assert len(attempts) == 2, attempts  # the killed attempt and the resumed one
        assert attempts[0]["returncode"] != 0 and not attempts[0]["stop_requested"], attempts
        assert attempts[1]["resume_from"] == str(nodes.shared / "checkpoint-4"), attempts
        assert attempts[1]["start_step"] == 4


def test_every_node_resumed_the_same_checkpoint(nodes: Nodes) -> None:
    """Each node's first process reports to its own daemon; the second attempt
    of both started at step 4 from the shared checkpoint-4 (rank 0's choice)."""
    for node in (nodes.first, nodes.second):
        lines = (node.state_dir / "runs" / JOB / "progress.jsonl").read_text().splitlines()
        starts = [r for r in map(json.loads, lines) if r.get("event") == "train_start"]
        assert [(s["step"], s["world_size"]) for s in starts] == [(0, 2), (4, 2)], starts
        assert starts[1]["resumed_from"] == str(nodes.shared / "checkpoint-4")


def test_the_run_ends_as_the_same_job_on_one_node(nodes: Nodes) -> None:
    import torch
    from safetensors.torch import load_file

    expected = losses(history(nodes.first, "ref"))
    assert [step for step, _ in expected] == list(range(1, MAX_STEPS + 1))
    for node in (nodes.first, nodes.second):
        got = dict(losses(history(node, JOB)))  # steps 5.. ran twice: the last run wins
        assert sorted(got) == list(range(1, MAX_STEPS + 1))
        assert got == dict(expected), node.state_dir
    name = f"checkpoint-{MAX_STEPS}/adapter_model.safetensors"
    ours, theirs = load_file(str(nodes.shared / name)), load_file(str(nodes.reference / name))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_the_nodes_shared_the_folder_lock_and_released_it(nodes: Nodes) -> None:
    group = outlock.group_lock_path(nodes.shared, f"ftsup-{JOB}")
    assert group.is_file()  # both nodes held it (a single-node lock would refuse one)
    assert not outlock.is_locked(nodes.shared)


def test_every_rank_resumes_rank_0s_choice_whatever_its_daemon_suggested(
    nodes: Nodes, tmp_path: Path
) -> None:
    """The agreement itself (trainer/nodes.py), with suggestions that differ: one
    node's daemon says checkpoint-4, the other's checkpoint-6. Both ranks start
    from the newest valid one, checkpoint-8, which rank 0 chose (run last: the
    runs end at once, max_steps reached)."""
    config = nodes.first.state_dir / "runs" / JOB / "train.json"
    launch = LaunchSection(
        nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_id="agree"
    )
    runs = []
    for suggested in ("checkpoint-4", "checkpoint-6"):
        progress = tmp_path / f"{suggested}.jsonl"
        process = TrainerProcess(
            config,
            launch=launch,
            resume_from=nodes.shared / suggested,
            env={"OMP_NUM_THREADS": "1", "FTSUP_PROGRESS_FILE": str(progress)},
        )
        runs.append((process, progress))
    try:
        for process, _ in runs:
            assert process.wait(timeout=180) == 0, process.log()
    finally:
        for process, _ in runs:
            process.kill_group()
    for _, progress in runs:
        starts = [
            json.loads(line)
            for line in progress.read_text().splitlines()
            if '"train_start"' in line
        ]
        assert [s["resumed_from"] for s in starts] == [str(nodes.shared / "checkpoint-8")]
    logs = "".join(process.log() for process, _ in runs)
    assert "rank 0 resumes every node from" in logs
    assert "rank 0 chose" in logs and "which every node resumes" in logs
