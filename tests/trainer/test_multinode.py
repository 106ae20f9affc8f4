"""A multi-node job (issue 17): two daemons on one machine stand in for two nodes.

Each "node" is a daemon with its own state and runtime folders; both are given
the same job file (`[launch] nnodes = 2`, one process each, c10d rendezvous on
127.0.0.1, gloo) and write one shared output folder. Two failures, one run:

1. The second node's trainer is SIGKILLed once, when step 5 ends (checkpoint
   4 sealed). The first node's rank sees its peer vanish, so both attempts
   end, both daemons restart their launchers, and both resume checkpoint 4,
   the one rank 0 chose and published in the rendezvous store.
2. Later the second node disappears whole: its daemon and trainer SIGKILLed.
   The first node's attempt ends too, its next launcher waits in the
   rendezvous, and its daemon says so (`waiting_for_nodes`, no hang verdict).
   The second daemon is started again; it relaunches its job, the nodes meet,
   and both resume the same checkpoint.

The run must end with the LoRA weights of the same job run as two processes
on one node (the reference, a third job on the first daemon), bit for bit,
and with the same loss at every step. The nodes' rank order comes from the
rendezvous and may change between attempts; the gradient all-reduce gives the
same sum either way.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor import outlock
from ftsup.supervisor.contract import ENV_FAULT_AT_STEP, ENV_FAULT_ONCE_FILE, ENV_FAULT_STEP_DELAY
from ftsup.supervisor.spec_types import LaunchSection
from ftsup.supervisor.trainer_launch import RDZV_JOIN_TIMEOUT_S, torchrun_args
from tests.supervisor_harness import Harness, wait_for
from tests.trainer.trainer_helpers import TrainerProcess, node_job_text

pytestmark = pytest.mark.slow  # trains real models: starts first (tests/conftest.py)

MAX_STEPS = 10
JOB = "mn"
ENDED = ("finished", "failed", "gave_up", "stopped")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def job_text(name: str, model: Path, data: Path, out: Path, launch: str) -> str:
    return node_job_text(name, model, data, out, launch, max_steps=MAX_STEPS)


@dataclass
class Nodes:
    first: Harness
    second: Harness
    shared: Path  # the job's output folder
    reference: Path
    statuses: list[dict[str, Any]]  # each node's final status
    waiting: dict[str, Any]  # the first node's status while the second was gone


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
            node.env[ENV_FAULT_STEP_DELAY] = "0.3"  # time to act between steps
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

        # Failure 2, once the resumed run is past checkpoint 6 on the second node.
        def resumed_past_6() -> bool:
            starts = [r for r in second.progress_lines(JOB) if r.get("event") == "train_start"]
            steps = [r["step"] for r in second.progress_lines(JOB) if r.get("event") == "step"]
            return len(starts) == 2 and max(steps, default=0) >= 7

        wait_for(resumed_past_6, 300, 0.05, "the resumed run to pass step 7")
        second.cleanup_processes()  # the node is gone: daemon, shim, launcher, trainer

        def first_waits() -> dict[str, Any] | None:
            """Waiting, and the shared view says so too (it is refreshed every few s)."""
            status = first.status(JOB)
            view = (status.get("nodes") or {}).get("nodes") or []
            shown = any(n["self"] and n["waiting_for_nodes"] for n in view)
            return status if status.get("waiting_for_nodes") and shown else None

        waiting = wait_for(first_waits, 300, 0.2, "the first node to wait for the second")
        second.start_daemon()  # the node is back: its daemon relaunches the job
        statuses = [node.wait_state(JOB, *ENDED, timeout=600) for node in (first, second)]

        reference = first.work / "reference-out"
        path = first.work / "reference.toml"
        path.write_text(job_text("ref", tiny_model, arith_data, reference, "nproc_per_node = 2"))
        first.cli("start", str(path))
        assert first.wait_state("ref", *ENDED, timeout=600)["state"] == "finished"
        yield Nodes(first, second, shared, reference, statuses, dict(waiting))
    finally:
        for node in (first, second):
            node.cleanup()


def test_both_nodes_finish_after_a_trainer_and_then_a_whole_node_were_lost(
    nodes: Nodes,
) -> None:
    assert [s["state"] for s in nodes.statuses] == ["finished", "finished"], nodes.statuses
    assert (nodes.second.work / "fault-fired").exists()
    for node in (nodes.first, nodes.second):
        attempts = node.status(JOB)["attempt_history"]
        assert len(attempts) == 3, attempts  # killed trainer, lost node, the last one
        for ended in attempts[:2]:
            assert ended["returncode"] != 0 and not ended["stop_requested"], attempts
        assert attempts[1]["resume_from"] == str(nodes.shared / "checkpoint-4"), attempts
        assert attempts[1]["start_step"] == 4
        kinds = [e["kind"] for e in node.cli_json("events", JOB)["events"]]
        assert "hung" not in kinds


def test_the_remaining_node_says_it_waits_for_the_lost_one(nodes: Nodes) -> None:
    waiting = nodes.waiting
    assert waiting["state"] == "running", waiting
    assert waiting["waiting_for_nodes"].startswith(
        f"waiting for nodes: rendezvous ftsup-{JOB} at 127.0.0.1:"
    )
    assert waiting["waiting_for_nodes"].endswith("needs 2 node(s)")
    events = nodes.first.cli_json("events", JOB)["events"]
    kinds = [e["kind"] for e in events]
    assert "waiting_for_nodes" in kinds and "nodes_joined" in kinds
    # It waited in its third attempt (the second ended when the node went away).
    assert waiting["attempts"] == 3, waiting


def test_status_on_either_node_shows_both_nodes(nodes: Nodes) -> None:
    """Each daemon writes its part into the shared folder (`.ftsup-nodes/`) and
    reads the other's: while the second node was gone, the first showed itself
    waiting and the second's last record; at the end both show both finished."""
    during = nodes.waiting["nodes"]["nodes"]
    (this,) = [n for n in during if n["self"]]
    assert this["state"] == "running" and this["waiting_for_nodes"].startswith("waiting for")
    (other,) = [n for n in during if not n["self"]]  # its last record, before it died
    assert other["state"] in ("starting", "running") and other["node"] != this["node"], during

    def both_finished(node: Harness) -> list[dict[str, Any]] | None:
        view = node.status(JOB)["nodes"]
        states = sorted(n["state"] for n in view["nodes"])
        return view["nodes"] if states == ["finished", "finished"] else None

    for node in (nodes.first, nodes.second):
        seen = wait_for(lambda node=node: both_finished(node), 60, 0.5, "both nodes finished")
        assert sorted(n["self"] for n in seen) == [False, True]
        assert {n["step"] for n in seen} == {MAX_STEPS}
    text = nodes.first.cli("status", JOB).stdout
    assert "(this)" in text and text.count("finished") >= 3, text


def test_every_node_resumed_the_same_checkpoints(nodes: Nodes) -> None:
    """Each node's first process reports to its own daemon: every attempt of both
    nodes started from the same checkpoint, rank 0's choice."""
    starts = []
    for node in (nodes.first, nodes.second):
        node_starts = [r for r in node.progress_lines(JOB) if r.get("event") == "train_start"]
        assert [s["world_size"] for s in node_starts] == [2, 2, 2], node_starts
        starts.append([(s["step"], s["resumed_from"]) for s in node_starts])
    assert starts[0] == starts[1]
    (_, first), (four, second), (last, third) = starts[0]
    assert first is None and (four, second) == (4, str(nodes.shared / "checkpoint-4"))
    assert last >= 6 and third == str(nodes.shared / f"checkpoint-{last}")


def test_the_run_ends_as_the_same_job_on_one_node(nodes: Nodes) -> None:
    import torch
    from safetensors.torch import load_file

    expected = nodes.first.step_losses("ref")
    assert [step for step, _ in expected] == list(range(1, MAX_STEPS + 1))
    for node in (nodes.first, nodes.second):
        got = dict(node.step_losses(JOB))  # steps 5.. ran twice: the last run wins
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
    from the newest valid one, the last, which rank 0 chose (run last: the runs
    end at once, max_steps reached)."""
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
        newest = str(nodes.shared / f"checkpoint-{MAX_STEPS}")
        assert [s["resumed_from"] for s in starts] == [newest]
    logs = "".join(process.log() for process, _ in runs)
    assert "rank 0 resumes every node from" in logs
    assert "rank 0 chose" in logs and "which every node resumes" in logs


def test_min_nodes_passes_a_node_range_and_the_rendezvous_settings() -> None:
    launch = LaunchSection(
        nproc_per_node=8, nnodes=4, min_nodes=2, rdzv_endpoint="n1:29400", rdzv_last_call=5.0
    )
    args = torchrun_args(launch, rdzv_id="ftsup-x")
    assert "--nnodes=2:4" in args and "--rdzv-id=ftsup-x" in args
    assert f"--rdzv-conf=join_timeout={RDZV_JOIN_TIMEOUT_S},last_call_timeout=5" in args
    fixed = torchrun_args(LaunchSection(nnodes=2, rdzv_endpoint="n1:1"), rdzv_id="y")
    assert "--nnodes=2" in fixed and f"--rdzv-conf=join_timeout={RDZV_JOIN_TIMEOUT_S}" in fixed


@dataclass
class Shrunk:
    node: Harness  # the node that stayed
    status: dict[str, Any]
    reference: list[tuple[int, float]]
    lost_node_losses: list[tuple[int, float]]  # what the lost node logged, all attempts


@pytest.fixture(scope="module")
def shrunk(nodes: Nodes, tiny_model: Path, arith_data: Path) -> Iterator[Shrunk]:
    """`min_nodes = 1`: the second node is lost for good after checkpoint 2; the
    first goes on alone with the same global batch (accumulation 1 -> 2)."""
    first, second = Harness(), Harness()
    try:
        for node in (first, second):
            node.env["OMP_NUM_THREADS"] = "1"
            node.env[ENV_FAULT_STEP_DELAY] = "0.3"
        launch = (
            "nproc_per_node = 1\nnnodes = 2\nmin_nodes = 1\n"
            f'rdzv_endpoint = "127.0.0.1:{free_port()}"\nrdzv_last_call = "1s"'
        )
        text = job_text(JOB, tiny_model, arith_data, first.work / "out", launch)
        # Both daemons first, then both jobs back to back, so that the launchers
        # usually meet within the 1 s last call. A first node that begins alone is
        # regrown by torchrun when the second arrives, and under CI load that round
        # has stalled for torch's 60 s (role_info keys, seen in the trainer log).
        for node in (first, second):
            node.start_daemon()
            (node.work / "mn.toml").write_text(text)
        for node in (first, second):
            node.cli("start", str(node.work / "mn.toml"))

        def past_step_3() -> bool:
            steps = [r["step"] for r in second.progress_lines(JOB) if r.get("event") == "step"]
            return max(steps, default=0) >= 3

        wait_for(past_step_3, 300, 0.05, "the run to pass step 3")
        second.cleanup_processes()  # gone for good
        status = first.wait_state(JOB, *ENDED, timeout=600)
        lost = [
            (r["step"], r["loss"])
            for r in second.progress_lines(JOB)
            if r.get("event") == "step" and r.get("loss") is not None
        ]
        yield Shrunk(first, status, nodes.first.step_losses("ref"), lost)
    finally:
        for node in (first, second):
            node.cleanup()


def test_with_min_nodes_the_run_goes_on_alone_with_the_same_global_batch(
    shrunk: Shrunk,
) -> None:
    assert shrunk.status["state"] == "finished", shrunk.status
    starts = [r for r in shrunk.node.progress_lines(JOB) if r.get("event") == "train_start"]
    geometry = [(s["world_size"], s["gradient_accumulation_steps"]) for s in starts]
    # Two nodes, then the lost one: alone with twice the accumulation. (The first
    # node may also have begun alone, before the second's launcher arrived within
    # the 1 s last call, and grown to two when it did: torchrun's own regrowth.)
    assert geometry[-2:] == [(2, 1), (1, 2)], starts
    assert set(geometry[:-2]) <= {(1, 2)}, starts
    resumed = starts[-1]["step"]
    assert resumed >= 2 and starts[-1]["resumed_from"].endswith(f"checkpoint-{resumed}")
    events = shrunk.node.cli_json("events", JOB)["events"]
    assert any(
        e["kind"] == "resized"
        and "world size 2 -> 1, accumulation 1 -> 2, global batch 4 kept" in e["message"]
        for e in events
    ), [e["message"] for e in events]
    # Alone, one process sums the gradient of both halves itself: the same
    # update up to float rounding (test_elastic_jobs), so every step matches the
    # two-process reference within 1e-5 relative.
    expected = dict(shrunk.reference)
    # Every step is logged by a node that trained it. With min_nodes = 1 the nodes
    # may each run alone in turn before they meet (the CI of stops 24 and 12, and
    # session 13's, which printed this evidence: the second node trained step 2
    # alone, so only its records hold it), so both nodes' records count.
    got = shrunk.node.step_losses(JOB) + shrunk.lost_node_losses
    evidence = json.dumps({"train_starts": starts, "losses": got})
    assert {step for step, _ in got} == set(expected), evidence
    for step, loss in got:
        assert math.isclose(loss, expected[step], rel_tol=1e-5), (step, loss, expected[step])
    # The node that stayed trained every step after it was left alone.
    assert {s for s, _ in shrunk.node.step_losses(JOB)} >= set(range(resumed + 1, MAX_STEPS + 1))
