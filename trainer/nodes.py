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
choice: nothing to agree on. A one-process node of a multi-node job that
runs alone (`min_nodes`; the daemon's ENV_NODES says the job spans nodes)
chooses as rank 0 would: with `min_nodes = 1` two nodes can each run alone in
turn, and one that took its own daemon's older choice trained steps again and
retired the newer checkpoints the other had saved (session 13).

Node-local folders (`save_on_each_node`: the same path on every node, each on
its own disk) are seen by their own node only. Each node's first process
judges its own copies (and quarantines its own invalid newer ones: nobody else
writes there) and publishes its resumable steps; rank 0 picks the newest step
every node holds and publishes the step, which each rank resumes from its own
folder. Newer copies that some node lacks are retired when training begins
(`FtsupCallback.on_train_begin`), since those steps are written again.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import ENV_NODES, PROGRESS_RENDEZVOUS, checkpoint_name
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


def of_a_multi_node_job() -> bool:
    """This node belongs to a job of several nodes (the daemon's ENV_NODES), even
    while it runs alone (`min_nodes`): then another node may have saved newer
    checkpoints into the shared folder than this node's daemon saw, and with
    `min_nodes = 1` the nodes can each run alone in turn."""
    try:
        return int(os.environ.get(ENV_NODES, "1")) > 1
    except ValueError:
        return False


def node_ranks() -> tuple[int, ...]:
    """The global ranks of this node's processes: torchrun numbers each node's
    workers consecutively (its base rank + local rank)."""
    first = dist.rank() - dist.local_rank()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.world_size())))
    return tuple(range(first, first + local_world))


def agree_on_resume(
    suggested: Path | None,
    output_dir: Path,
    timeout_s: float,
    *,
    require_manifest: bool | None = True,
    node_local: bool = False,
) -> Path | None:
    """The checkpoint every rank resumes: rank 0's choice on a multi-node run.

    `require_manifest`: as the daemon judges the job's checkpoints (True for the
    built-in trainer's; None, decided by the folder, for a `[command]` job's).
    `node_local`: every node has its own `output_dir` (`save_on_each_node`); the
    result is the agreed step's folder in this node's `output_dir`."""
    if not multi_node():
        if dist.world_size() == 1 and not node_local and of_a_multi_node_job():
            # One process of a multi-node job, alone for now (`min_nodes`): it is rank
            # 0, and chooses from the shared folder, which another node may have
            # written since its daemon looked. (Alone with several processes it keeps
            # its daemon's choice: a store key of this world size may be an earlier
            # round's, so its other ranks could not tell rank 0's answer from it.)
            return _choose(output_dir, require_manifest)
        return suggested
    store = _store(timeout_s)
    _report_joined()
    # One key per rendezvous round. torchrun's restart count stays the same when
    # nodes join a running job (`min_nodes`), but then the world grows, and it
    # never shrinks within one launcher (a lost node ends the attempt).
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"{STORE_PREFIX}/{restarts}/{dist.world_size()}"
    if node_local:
        return _agree_node_local(store, key, suggested, output_dir, require_manifest)
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
    value = _read(store, key)
    choice = None if value == NONE else Path(value)
    _say_if_overruled(suggested, choice)
    return choice


def _read(store: Any, key: str) -> str:
    """Rank 0's published value (ResumeAgreementError if it published a failure)."""
    store.wait([key])
    value = str(store.get(key).decode())
    if value.startswith(FAILED):
        raise ResumeAgreementError(f"rank 0 could not choose a checkpoint: {value[len(FAILED) :]}")
    return value


def _say_if_overruled(suggested: Path | None, choice: Path | None) -> None:
    if choice != suggested and dist.local_rank() == 0 and dist.rank() != 0:
        print(
            f"ftsup trainer: this node's daemon chose {suggested or 'the start'}; "
            f"rank 0 chose {choice or 'the start'}, which every node resumes",
            file=sys.stderr,
        )


def _agree_node_local(
    store: Any,
    key: str,
    suggested: Path | None,
    output_dir: Path,
    require_manifest: bool | None,
) -> Path | None:
    """Each node's first process publishes the steps its own folder can resume;
    rank 0 publishes the newest step on every node's list; every rank resumes that
    step from its own folder. A node's failure reaches everyone through rank 0."""
    local_world = len(node_ranks())
    node = int(os.environ.get("GROUP_RANK", str(dist.rank() // local_world)))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", str(dist.world_size() // local_world)))
    step_key = f"{key}/step"
    if dist.local_rank() == 0:
        try:
            steps = _node_steps(output_dir, require_manifest)
        except BaseException as exc:
            reason = f"{FAILED}node {node}: {type(exc).__name__}: {exc}"
            store.set(f"{key}/node/{node}", reason)
            if dist.rank() == 0:
                store.set(step_key, reason)
            raise
        store.set(f"{key}/node/{node}", json.dumps(steps))
    if dist.rank() == 0:
        try:
            step = _choose_common(store, key, nodes)
        except BaseException as exc:
            why = (
                str(exc)
                if isinstance(exc, ResumeAgreementError)
                else f"{type(exc).__name__}: {exc}"
            )
            store.set(step_key, f"{FAILED}{why}")
            raise
        store.set(step_key, NONE if step is None else str(step))
    value = _read(store, step_key)
    choice = None if value == NONE else Path(output_dir) / checkpoint_name(int(value))
    _say_if_overruled(suggested, choice)
    if choice is not None and dist.local_rank() == 0:
        _warn_if_ranks_moved(choice)
    return choice


def _warn_if_ranks_moved(choice: Path) -> None:
    """The rendezvous numbers the nodes anew each round (by host name, so on a
    cluster the order normally holds): a rank whose RNG state another node
    saved starts with a fresh one, which HF only logs at info level."""
    missing = [r for r in node_ranks() if not (choice / f"rng_state_{r}.pth").is_file()]
    if missing:
        print(
            f"ftsup trainer: warning: {choice} holds no RNG state of rank(s) "
            f"{', '.join(map(str, missing))} (this node ran other ranks when it saved): "
            "they resume with fresh random state (dropout differs from an uninterrupted run)",
            file=sys.stderr,
        )


def _node_steps(output_dir: Path, require_manifest: bool | None) -> list[int]:
    """This node's resumable steps, newest first; its invalid newer copies are
    quarantined on the way (this node alone writes its folder)."""
    from ftsup.supervisor.checkpoints.discovery import resumable_steps

    steps, choice = resumable_steps(
        output_dir,
        world_size=dist.world_size(),
        require_manifest=require_manifest,
        ranks=node_ranks(),
    )
    for moved in choice.quarantined:
        print(
            f"ftsup trainer: quarantined {moved.moved_to.name}: {moved.report.reason}",
            file=sys.stderr,
        )
    return steps


def _choose_common(store: Any, key: str, nodes: int) -> int | None:
    """The newest step every node can resume (None: start over); a node's failure
    is raised here, so rank 0 passes it on to every rank."""
    keys = [f"{key}/node/{node}" for node in range(nodes)]
    store.wait(keys)
    held: list[set[int]] = []
    for node_key in keys:
        value = str(store.get(node_key).decode())
        if value.startswith(FAILED):
            raise ResumeAgreementError(value[len(FAILED) :])
        held.append({int(step) for step in json.loads(value)})
    common = set.intersection(*held) if held else set()
    step = max(common, default=None)
    newest = max(set().union(*held), default=None)
    where = f"checkpoint-{step}" if step is not None else "the start"
    lacking = ""
    if newest is not None and newest != step:
        short = [str(n) for n, steps in enumerate(held) if newest not in steps]
        lacking = f" (node {', '.join(short)} lacks step {newest}: newer copies are retired)"
    print(
        f"ftsup trainer: rank 0 resumes every node from {where} in its own folder{lacking}",
        file=sys.stderr,
    )
    return step


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


__all__ = [
    "ResumeAgreementError",
    "agree_on_resume",
    "multi_node",
    "node_ranks",
    "of_a_multi_node_job",
]
