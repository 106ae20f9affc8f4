"""The multi-node resume agreement against a real TCPStore (the kind torchrun's
rendezvous runs), one rank per call: what a non-zero rank does with rank 0's
choice, and with rank 0's failure (it must not wait for a choice that never
comes). The whole two-node path runs in test_multinode."""

from __future__ import annotations

import socket
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
