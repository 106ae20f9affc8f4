"""One resume point for every node of a multi-node run (issue 17).

Each node's daemon picks the checkpoint it would resume, from what it sees
of the shared output folder, and may see it differently (a save still being
flushed by another node, a slow NFS attribute cache). The nodes must not
resume different steps, so the choice is made once, after torchrun's
rendezvous put every node's workers together: global rank 0 selects the
newest valid checkpoint with the supervisor's own `select_resume` (and
quarantines invalid newer folders, the only node that does), and publishes
it in the rendezvous store torchrun already runs (MASTER_ADDR:MASTER_PORT);
every other rank reads it from there. A single-node run keeps its daemon's
choice: nothing to agree on.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import PROGRESS_RENDEZVOUS
from ftsup.trainer import dist

STORE_PREFIX = "ftsup/resume"
NONE = "-"  # published when there is nothing to resume
FAILED = "!"  # prefixes rank 0's error when it could not choose


class ResumeAgreementError(RuntimeError):
    """Rank 0 failed to choose the checkpoint (its reason follows)."""


def multi_node() -> bool:
    """More processes in the run than on this node (torchrun's environment)."""
    world = dist.world_size()
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def agree_on_resume(
    suggested: Path | None,
    output_dir: Path,
    timeout_s: float,
    *,
    require_manifest: bool | None = True,
) -> Path | None:
    """The checkpoint every rank resumes: rank 0's choice on a multi-node run.

    `require_manifest`: as the daemon judges the job's checkpoints (True for the
    built-in trainer's; None, decided by the folder, for a `[command]` job's)."""
    if not multi_node():
        return suggested
    store = _store(timeout_s)
    _report_joined()
    # One key per rendezvous round. torchrun's restart count stays the same when
    # nodes join a running job (`min_nodes`), but then the world grows, and it
    # never shrinks within one launcher (a lost node ends the attempt).
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"{STORE_PREFIX}/{restarts}/{dist.world_size()}"
    if dist.rank() == 0:
        try:
            choice = _choose(output_dir, require_manifest)
        except BaseException as exc:  # the others must not wait for a choice that never comes
            store.set(key, f"{FAILED}{type(exc).__name__}: {exc}")
            raise
        store.set(key, str(choice) if choice is not None else NONE)
        print(
            f"ftsup trainer: rank 0 resumes every node from {choice or 'the start'}",
            file=sys.stderr,
        )
        return choice
    store.wait([key])
    value = store.get(key).decode()
    if value.startswith(FAILED):
        raise ResumeAgreementError(f"rank 0 could not choose a checkpoint: {value[len(FAILED) :]}")
    choice = None if value == NONE else Path(value)
    if choice != suggested and dist.local_rank() == 0:
        print(
            f"ftsup trainer: this node's daemon chose {suggested or 'the start'}; "
            f"rank 0 chose {choice or 'the start'}, which every node resumes",
            file=sys.stderr,
        )
    return choice


def _report_joined() -> None:
    """Every node is here (this code runs after the rendezvous): the node's daemon
    stops waiting for nodes and times the start-up from now."""
    if dist.local_rank() != 0:
        return
    from ftsup.trainer.progress import ProgressWriter

    writer = ProgressWriter.from_env()
    writer.emit(PROGRESS_RENDEZVOUS, state="joined", world_size=dist.world_size())
    writer.close()


def _choose(output_dir: Path, require_manifest: bool | None) -> Path | None:
    from ftsup.supervisor.checkpoints.discovery import select_resume

    choice = select_resume(
        output_dir, world_size=dist.world_size(), require_manifest=require_manifest
    )
    for moved in choice.quarantined:
        print(
            f"ftsup trainer: quarantined {moved.moved_to.name}: {moved.report.reason}",
            file=sys.stderr,
        )
    return choice.path


def _store(timeout_s: float) -> Any:
    """A client of torchrun's rendezvous store (ftsup's keys start with STORE_PREFIX)."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    host = os.environ["MASTER_ADDR"]
    port = int(os.environ["MASTER_PORT"])
    return TCPStore(
        host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


__all__ = ["ResumeAgreementError", "agree_on_resume", "multi_node"]
