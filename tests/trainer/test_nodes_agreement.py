"""The multi-node resume agreement against a real TCPStore (the kind torchrun's
rendezvous runs), every rank a real process: what a non-zero rank does with rank
0's choice, with rank 0's failure (it must not wait for a choice that never
comes), and with an earlier round's answer left in torchrun's store (it must
never take it). The whole two-node path runs in test_multinode. Node-local
folders (`save_on_each_node`): one real process per node, each seeing its own
folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.contract import ENV_NODES
from ftsup.trainer.nodes import STORE_PREFIX, agree_on_resume


def node_copy(
    output_dir: Path, step: int, ranks: tuple[int, ...], *, world_size: int = 2, seal: bool = True
) -> Path:
    """One node's copy of `checkpoint-<step>` as HF's save_on_each_node writes it
    (weights, optimizer, scheduler, trainer state, and only this node's ranks' RNG
    files), sealed as the node's first process seals it (a manifest naming `ranks`).
    With every rank's RNG file it is a checkpoint of a shared folder."""
    import torch
    from safetensors.torch import save_file

    from ftsup.supervisor.manifest import build_manifest, write_manifest

    ckpt = output_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.full((4,), float(step))}, str(ckpt / "model.safetensors"))
    torch.save({"state": {}}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    for rank in ranks:
        torch.save({"rank": rank}, ckpt / f"rng_state_{rank}.pth")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if seal:
        manifest = build_manifest(
            ckpt, step=step, world_size=world_size, fingerprint={}, created_at=0.0, ranks=ranks
        )
        write_manifest(ckpt, manifest)
    return ckpt


_RANK = """
import json, os, sys
from pathlib import Path
from ftsup.trainer.nodes import agree_on_resume
suggested = Path(sys.argv[2]) if sys.argv[2] else None
require = True if sys.argv[3] == "1" else None
try:
    got = agree_on_resume(suggested, Path(sys.argv[1]), 20, node_local=sys.argv[4] == "1",
                          require_manifest=require)
    print(json.dumps({"resume": str(got) if got else None}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


def start_rank(
    port: int,
    folder: Path,
    *,
    rank: int,
    world: int,
    local_world: int = 1,
    suggested: Path | None = None,
    node_local: bool = False,
    require_manifest: bool = True,
    nodes: int | None = None,
) -> subprocess.Popen[str]:
    """One rank as torchrun starts it after the rendezvous (torchrun's store at
    `port`), calling the production agreement on `folder`."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % local_world),
        "GROUP_RANK": str(rank // local_world),
        "GROUP_WORLD_SIZE": str(world // local_world),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("FTSUP_PROGRESS_FILE", None)
    env.pop(ENV_NODES, None)
    if nodes is not None:
        env[ENV_NODES] = str(nodes)  # as the daemon sets it on every node of the job
    argv = [
        sys.executable,
        "-c",
        _RANK,
        str(folder),
        str(suggested or ""),
        str(int(require_manifest)),
        str(int(node_local)),
    ]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(processes: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    """Each rank's answer ({"resume": path} or {"error": ...}) and its log; every
    process is reaped, also when one fails."""
    try:
        results = []
        for process in processes:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
            results.append({**json.loads(out.splitlines()[-1]), "log": err})
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def run_nodes(
    port: int, folders: list[Path], *, require_manifest: bool = True, suggested: str = ""
) -> list[dict[str, Any]]:
    """One real process per node (one rank each), node-local folders: each is told
    only its own folder."""
    processes: list[subprocess.Popen[str]] = []
    try:
        for node, folder in enumerate(folders):
            processes.append(
                start_rank(
                    port,
                    folder,
                    rank=node,
                    world=len(folders),
                    suggested=Path(suggested) if suggested else None,
                    node_local=True,
                    require_manifest=require_manifest,
                )
            )
    except BaseException:
        for process in processes:
            process.kill()
            process.wait()
        raise
    return finish(processes)


@pytest.fixture
def server() -> Iterator[tuple[Any, int]]:
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30)), port


def test_every_rank_takes_rank_0s_choice_over_its_daemons(
    server: tuple[Any, int], tmp_path: Path
) -> None:
    """Rank 1's daemon suggested checkpoint-4 (it had not seen 6 yet): both ranks
    resume rank 0's choice, the shared folder's newest, and rank 1 says so."""
    older = node_copy(tmp_path, 4, (0, 1))
    newer = node_copy(tmp_path, 6, (0, 1))
    port = server[1]
    results = finish(
        [
            start_rank(port, tmp_path, rank=0, world=2, suggested=older),
            start_rank(port, tmp_path, rank=1, world=2, suggested=older),
        ]
    )
    assert [r.get("resume") for r in results] == [str(newer), str(newer)], results
    assert "rank 0 chose" in results[1]["log"]


def test_rank_0s_failure_reaches_the_others_at_once(
    server: tuple[Any, int], tmp_path: Path
) -> None:
    """Rank 0 cannot list the folder: rank 1 gets its reason, not a store timeout."""
    folder = tmp_path / "out"
    folder.write_text("not a folder")
    port = server[1]
    results = finish(
        [start_rank(port, folder, rank=0, world=2), start_rank(port, folder, rank=1, world=2)]
    )
    assert results[0].get("error", "").startswith("NotADirectoryError"), results
    assert (
        results[1]
        .get("error", "")
        .startswith(
            "ResumeAgreementError: rank 0 could not choose a checkpoint: NotADirectoryError"
        )
    ), results


def test_a_rank_never_takes_an_earlier_rounds_answer(
    server: tuple[Any, int], tmp_path: Path
) -> None:
    """torchrun's store outlives rounds, and two rounds can have the same restart
    count and world size (nodes that leave and join in turn under `min_nodes`).
    Round 1 agrees on checkpoint-2; checkpoint-4 is saved; in round 2 rank 1 starts
    well before rank 0. It must wait for round 2's answer, not take round 1's
    (which the store still holds under the same key)."""
    node_copy(tmp_path, 2, (0, 1))
    port = server[1]
    first = finish(
        [start_rank(port, tmp_path, rank=0, world=2), start_rank(port, tmp_path, rank=1, world=2)]
    )
    assert [r.get("resume") for r in first] == [str(tmp_path / "checkpoint-2")] * 2, first
    newer = node_copy(tmp_path, 4, (0, 1))
    second = rank_1_first(port, tmp_path)
    assert [r.get("resume") for r in second] == [str(newer), str(newer)], second


def test_a_rank_never_takes_an_earlier_ftsups_plain_answer(
    server: tuple[Any, int], tmp_path: Path
) -> None:
    """Before session 14 rank 0 wrote its choice itself under the same key: a store
    that still holds one (a launcher that outlived an upgrade) is not an answer."""
    node_copy(tmp_path, 2, (0, 1))
    newer = node_copy(tmp_path, 4, (0, 1))
    server[0].set(f"{STORE_PREFIX}/0/2", str(tmp_path / "checkpoint-2"))
    results = rank_1_first(server[1], tmp_path)
    assert [r.get("resume") for r in results] == [str(newer), str(newer)], results
    assert "not an announcement" in results[1]["log"]


def rank_1_first(port: int, folder: Path) -> list[dict[str, Any]]:
    """Ranks 0 and 1 of a world of 2, rank 0 started only once rank 1 has found
    that what the key holds is no answer of this round."""
    early = start_rank(port, folder, rank=1, world=2)
    try:
        assert early.stderr is not None
        seen = []
        while not any("names a store that is gone" in line for line in seen):
            line = early.stderr.readline()
            assert line, f"rank 1 ended without waiting for this round: {''.join(seen)}"
            seen.append(line)
        late = start_rank(port, folder, rank=0, world=2)
    except BaseException:
        early.kill()
        early.wait()
        raise
    results = finish([late, early])
    results[1]["log"] = "".join(seen) + results[1]["log"]
    return results


def test_the_processes_of_a_lone_node_take_its_rank_0s_choice(
    server: tuple[Any, int], tmp_path: Path
) -> None:
    """A node of a two-node job runs alone with two processes (`min_nodes = 1`):
    its daemon's choice (from the start) is older than what the other node saved
    into the shared folder; both processes resume the folder's newest, as rank 0
    chose it."""
    newer = node_copy(tmp_path, 6, (0, 1))
    port = server[1]
    results = finish(
        [start_rank(port, tmp_path, rank=rank, world=2, local_world=2, nodes=2) for rank in (0, 1)]
    )
    assert [r.get("resume") for r in results] == [str(newer), str(newer)], results


def test_a_single_node_run_keeps_its_daemons_choice(
    server: tuple[Any, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ranks on this node of a one-node job: nothing to agree on, nothing read."""
    older = node_copy(tmp_path, 4, (0, 1))
    node_copy(tmp_path, 6, (0, 1))
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(server[1]),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(ENV_NODES, raising=False)
    assert agree_on_resume(older, tmp_path, timeout_s=10) == older
    assert server[0].num_keys() == 0  # nothing was announced


def test_node_local_folders_resume_the_newest_step_every_node_holds(
    server: tuple[Any, int], tmp_path: Path
) -> None:
    """Node 0 holds 2, 4, 6; node 1 lost its 6 (never sealed): both resume 4, each
    from its own folder, and node 1's unsealed 6 is quarantined by node 1 itself."""
    first, second = tmp_path / "node0", tmp_path / "node1"
    for step in (2, 4, 6):
        node_copy(first, step, (0,))
    for step in (2, 4):
        node_copy(second, step, (1,))
    node_copy(second, 6, (1,), seal=False)
    results = run_nodes(server[1], [first, second])
    assert [r.get("resume") for r in results] == [
        str(first / "checkpoint-4"),
        str(second / "checkpoint-4"),
    ], results
    assert (first / "checkpoint-6").is_dir()  # valid there: retired later, at train begin
    assert not (second / "checkpoint-6").exists()  # quarantined by its own node
    assert "node 1 lacks step 6" in results[0]["log"]


def test_node_local_agreement_judges_hf_only_copies_by_the_nodes_ranks(
    server: tuple[Any, int], tmp_path: Path
) -> None:
    """A [command] job's checkpoints (HF's own, no manifest): node 1's copies hold
    rng_state_1.pth only and are resumable there; node 0's newest lacks its rank's
    RNG file (an interrupted save), so the common step is the older one."""
    first, second = tmp_path / "node0", tmp_path / "node1"
    for step in (3, 6):
        node_copy(first, step, (0,), seal=False)
        node_copy(second, step, (1,), seal=False)
    (first / "checkpoint-6" / "rng_state_0.pth").unlink()
    results = run_nodes(server[1], [first, second], require_manifest=False)
    assert [r.get("resume") for r in results] == [
        str(first / "checkpoint-3"),
        str(second / "checkpoint-3"),
    ], results


def test_a_node_that_cannot_choose_stops_every_node_at_once(
    server: tuple[Any, int], tmp_path: Path
) -> None:
    """Node 1's folder cannot be listed: it publishes its failure, rank 0 passes it
    on, and both exit with it instead of waiting out the store timeout."""
    first, second = tmp_path / "node0", tmp_path / "node1"
    node_copy(first, 2, (0,))
    second.write_text("not a folder")
    results = run_nodes(server[1], [first, second])
    assert (
        results[0].get("error", "").startswith("ResumeAgreementError: node 1: NotADirectoryError")
    ), results
    assert results[1].get("error", "").startswith("NotADirectoryError"), results
