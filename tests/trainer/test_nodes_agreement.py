"""The multi-node resume agreement against a real TCPStore (the kind torchrun's
rendezvous runs), one rank per call: what a non-zero rank does with rank 0's
choice, and with rank 0's failure (it must not wait for a choice that never
comes). The whole two-node path runs in test_multinode. Node-local folders
(`save_on_each_node`): one real process per node, each seeing its own folder."""

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

from ftsup.trainer.nodes import FAILED, STORE_PREFIX, ResumeAgreementError, agree_on_resume


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A store served here, and this process made rank 1 of 2 on a node of its own."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10))
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "1",
        "RANK": "1",
        "LOCAL_RANK": "0",
        "TORCHELASTIC_RESTART_COUNT": "0",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FTSUP_PROGRESS_FILE", raising=False)
    yield server


def test_a_rank_takes_rank_0s_choice_over_its_daemons(store: Any, tmp_path: Path) -> None:
    store.set(f"{STORE_PREFIX}/0/2", str(tmp_path / "checkpoint-6"))
    got = agree_on_resume(tmp_path / "checkpoint-4", tmp_path, timeout_s=10)
    assert got == tmp_path / "checkpoint-6"


def test_rank_0s_failure_reaches_the_others_at_once(store: Any, tmp_path: Path) -> None:
    store.set(f"{STORE_PREFIX}/0/2", f"{FAILED}PermissionError: /shared/out")
    with pytest.raises(ResumeAgreementError, match="PermissionError: /shared/out"):
        agree_on_resume(tmp_path / "checkpoint-4", tmp_path, timeout_s=10)


def test_one_node_keeps_its_daemons_choice(
    store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # both ranks on this node
    assert agree_on_resume(tmp_path / "checkpoint-4", tmp_path, timeout_s=10) == (
        tmp_path / "checkpoint-4"
    )


# ------------------------------------------------ node-local folders (save_on_each_node)


def node_copy(
    output_dir: Path, step: int, ranks: tuple[int, ...], *, world_size: int = 2, seal: bool = True
) -> Path:
    """One node's copy of `checkpoint-<step>` as HF's save_on_each_node writes it
    (weights, optimizer, scheduler, trainer state, and only this node's ranks' RNG
    files), sealed as the node's first process seals it (a manifest naming `ranks`)."""
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


_NODE = """
import json, os, sys
from pathlib import Path
from ftsup.trainer.nodes import agree_on_resume
suggested = Path(sys.argv[2]) if sys.argv[2] else None
require = True if sys.argv[3] == "1" else None
try:
    got = agree_on_resume(suggested, Path(sys.argv[1]), 20, node_local=True,
                          require_manifest=require)
    print(json.dumps({"resume": str(got) if got else None}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


def run_nodes(
    port: int, folders: list[Path], *, require_manifest: bool = True, suggested: str = ""
) -> list[dict[str, Any]]:
    """One real process per node (one rank each), as torchrun starts them after the
    rendezvous; each is told only its own folder. Every process is reaped."""
    processes = []
    try:
        for node, folder in enumerate(folders):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "WORLD_SIZE": str(len(folders)),
                "LOCAL_WORLD_SIZE": "1",
                "RANK": str(node),
                "LOCAL_RANK": "0",
                "GROUP_RANK": str(node),
                "GROUP_WORLD_SIZE": str(len(folders)),
                "TORCHELASTIC_RESTART_COUNT": "0",
                "OMP_NUM_THREADS": "1",
            }
            env.pop("FTSUP_PROGRESS_FILE", None)
            argv = [sys.executable, "-c", _NODE, str(folder), suggested, str(int(require_manifest))]
            processes.append(
                subprocess.Popen(
                    argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
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


@pytest.fixture
def server() -> Iterator[tuple[Any, int]]:
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30)), port


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
