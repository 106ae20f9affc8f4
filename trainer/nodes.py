"""One resume point for every node of a multi-node run (issue 17).

Each node's daemon picks the checkpoint it would resume, from what it sees
of the shared output folder, and may see it differently (a save still being
flushed by another node, a slow NFS attribute cache). The nodes must not
resume different steps, so the choice is made once, after torchrun's
rendezvous put every node's workers together: global rank 0 selects the
newest valid checkpoint with the supervisor's own `select_resume` (and
quarantines invalid newer folders, the only node that does), and publishes
it; every other rank reads it. A single-node run keeps its daemon's choice:
nothing to agree on. A node of a multi-node job that runs alone (`min_nodes`;
the daemon's ENV_NODES says the job spans nodes) chooses as rank 0 would: with
`min_nodes = 1` two nodes can each run alone in turn, and one that took its
own daemon's older choice trained steps again and retired the newer
checkpoints the other had saved (session 13).

Rank 0 answers through a store of its own, served for this round only
(`_round_store`): torchrun's store lives as long as the launcher that serves
it, across rounds, and with `min_nodes` two rounds can have the same restart
count and world size (nodes that leave and join in turn), so a key there may
hold an earlier round's answer that a rank cannot tell from this one's. Rank
0's own server ends with rank 0's process, and every worker of a round has
ended before the next round's start, so a rank that reaches the server an
announcement names (and finds its nonce there) has reached this round's rank 0.
The announcement goes into torchrun's store (MASTER_ADDR:MASTER_PORT).

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
import secrets
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import ENV_NODES, PROGRESS_RENDEZVOUS, checkpoint_name
from ftsup.trainer import dist

STORE_PREFIX = "ftsup/resume"
NONE = "-"  # published when there is nothing to resume
FAILED = "!"  # prefixes rank 0's error when it could not choose
CHOICE_KEY = "choice"  # in the round's store: rank 0's answer
NONCE_KEY = "nonce"  # in the round's store: the nonce its announcement names
PROBE_S = 2.0  # to reach an announced server; one that is gone refuses at once
RETRY_S = 0.1  # between readings of an announcement whose server was gone

# Rank 0's round stores, served until its process ends (a dropped TCPStore server
# stops serving, and a slow rank may still be on its way).
_SERVED: list[Any] = []


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
        if node_local or not of_a_multi_node_job():
            return suggested
        # A node of a multi-node job, alone for now (`min_nodes`): another node may
        # have written the shared folder since its daemon looked, so its rank 0
        # chooses from it as rank 0 of the whole job would.
        if dist.world_size() == 1:
            return _choose(output_dir, require_manifest)
    else:
        _report_joined()
    store = _round_store(timeout_s)
    if node_local:
        return _agree_node_local(store, suggested, output_dir, require_manifest)
    if dist.rank() == 0:
        try:
            choice = _choose(output_dir, require_manifest)
        except BaseException as exc:  # the others must not wait for a choice that never comes
            store.set(CHOICE_KEY, f"{FAILED}{type(exc).__name__}: {exc}")
            raise
        store.set(CHOICE_KEY, str(choice) if choice is not None else NONE)
        print(
            f"ftsup trainer: rank 0 resumes every node from {choice or 'the start'}",
            file=sys.stderr,
        )
        return choice
    value = _read(store, CHOICE_KEY)
    choice = None if value == NONE else Path(value)
    _say_if_overruled(suggested, choice)
    return choice


def _announcement_key() -> str:
    """Where rank 0 announces its round store in torchrun's store. The restart count
    and world size only narrow it down: two rounds can share both (module doc)."""
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"{STORE_PREFIX}/{restarts}/{dist.world_size()}"


def _round_store(timeout_s: float) -> Any:
    """A store that this rendezvous round's ranks alone reach: rank 0 serves it, and
    announces where, with a fresh nonce, in torchrun's store (module doc)."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    shared = _store(timeout_s)
    key = _announcement_key()
    timeout = timedelta(seconds=timeout_s)
    if dist.rank() == 0:
        nonce = secrets.token_hex(8)
        server = TCPStore(
            os.environ["MASTER_ADDR"], 0, is_master=True, timeout=timeout, wait_for_workers=False
        )
        server.set(NONCE_KEY, nonce)
        _SERVED.append(server)
        ours = {"host": os.environ["MASTER_ADDR"], "port": server.port, "nonce": nonce}
        shared.set(key, json.dumps(ours))
        return server
    deadline = time.monotonic() + timeout_s
    said: object = object()  # the announcement last said to be stale (none yet)
    while True:
        shared.wait([key])
        where = _announcement(shared.get(key))
        store = _reach(where, timeout) if where else None
        if store is not None:
            return store
        if where != said and dist.local_rank() == 0:
            print(
                f"ftsup trainer: {key} names a store that is gone "
                f"({where or 'not an announcement'}: an earlier round's); "
                "waiting for this round's",
                file=sys.stderr,
                flush=True,
            )
        said = where
        if time.monotonic() > deadline:
            raise ResumeAgreementError(
                f"rank 0's store ({where or 'not announced'} in {key}) could not be "
                f"reached within {timeout_s:.0f} s"
            )
        time.sleep(RETRY_S)  # an earlier round's announcement: rank 0's comes


def _announcement(value: bytes) -> dict[str, Any] | None:
    """An announcement's host, port and nonce; None for anything else (an earlier
    ftsup's plain answer under the same key, during an upgrade)."""
    try:
        where = json.loads(value.decode())
        if isinstance(where, dict) and {"host", "port", "nonce"} <= set(where):
            return where
    except ValueError:
        pass
    return None


def _reach(where: dict[str, Any], timeout: timedelta) -> Any:
    """A client of the announced round store, or None when it is not there: its
    server is gone (an earlier round's rank 0), or another one took its port."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    host, port = str(where["host"]), int(where["port"])
    try:  # a plain connect first: torch's client retries (and logs) until its timeout
        socket.create_connection((host, port), timeout=PROBE_S).close()
        store = TCPStore(
            host,
            port,
            is_master=False,
            timeout=timedelta(seconds=PROBE_S),
            wait_for_workers=False,
        )
        found = store.get(NONCE_KEY).decode() if store.check([NONCE_KEY]) else None
    except (OSError, RuntimeError):
        return None
    if found != where["nonce"]:
        return None
    store.set_timeout(timeout)
    return store


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
    step_key = "step"
    if dist.local_rank() == 0:
        try:
            steps = _node_steps(output_dir, require_manifest)
        except BaseException as exc:
            reason = f"{FAILED}node {node}: {type(exc).__name__}: {exc}"
            store.set(f"node/{node}", reason)
            if dist.rank() == 0:
                store.set(step_key, reason)
            raise
        store.set(f"node/{node}", json.dumps(steps))
    if dist.rank() == 0:
        try:
            step = _choose_common(store, nodes)
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


def _choose_common(store: Any, nodes: int) -> int | None:
    """The newest step every node can resume (None: start over); a node's failure
    is raised here, so rank 0 passes it on to every rank."""
    keys = [f"node/{node}" for node in range(nodes)]
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
