"""Every node of a multi-node job in one view, through the shared output folder.

Each node's daemon supervises only its own launcher, so no daemon knows the
others' state by itself. The output folder is the one thing every node shares
(the job writes its checkpoints there), so each daemon keeps a small record of
its part in `<output_dir>/.ftsup-nodes/<node>.json` (host, state, step,
attempt, what it waits for, when written) and reads the others' records from
there: `ftsup status JOB` on any node then lists every node. A record is a
report, not a lease: a node that stopped writing is shown with the age of its
last record, never judged dead from it.

The records also carry each node's failure counts and final state, so that the
restart limits hold per job: a node judges a failure with the highest counts
any node of the run has (`policy.OtherNodes`), and stops when another node of
the same run gave up (`gave_up_elsewhere`).

The folder is a user path (NFS may hang): every exchange runs in its own
thread, one at a time, and the event loop only ever reads the cached result.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ftsup.supervisor.atomicio import write_json_atomic
from ftsup.supervisor.policy import OtherNodes
from ftsup.supervisor.userfiles import NotRegularFile, read_bytes

NODES_DIR = ".ftsup-nodes"
EXCHANGE_EVERY_S = 5.0  # at most one write and read of the folder per interval
GAVE_UP = frozenset({"gave_up", "failed"})  # a node ended the run for good
ENDED = GAVE_UP | {"finished", "stopped"}  # records an earlier run may have left
QUIET_GRACE_S = 600.0
_RECORD_MAX = 64 * 1024
_MAX_NODES = 4096


def node_name(state_dir: Path) -> str:
    """This daemon's name among the job's nodes: host plus a hash of its state
    folder (two daemons on one host, as in tests, stay apart)."""
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


def exchange(output_dir: Path, own: dict[str, Any]) -> list[dict[str, Any]]:
    """Write this node's record, then read every node's (own included)."""
    folder = output_dir / NODES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{own['node']}.json", own)
    records = []
    for path in sorted(folder.glob("*.json"))[:_MAX_NODES]:
        with contextlib.suppress(OSError, NotRegularFile, ValueError):
            record = json.loads(read_bytes(path, limit=_RECORD_MAX))
            if isinstance(record, dict) and isinstance(record.get("node"), str):
                records.append(record)
    return records


class NodesView:
    """A runner's cached view of its job's nodes, refreshed off the event loop."""

    def __init__(self, output_dir: Path, node: str) -> None:
        self.output_dir = output_dir
        self.node = node
        self._records: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._last = float("-inf")  # monotonic time of the last exchange started
        self._pending: dict[str, Any] | None = None  # forced while an exchange ran
        self._lock = threading.Lock()
        self.error: str | None = None  # the last exchange's failure, shown with the view

    def refresh(self, own: dict[str, Any], *, force: bool = False) -> None:
        """Start an exchange unless the last was too recent; a forced one (a state
        change) that comes while another runs is written right after it."""
        now = time.monotonic()
        record = {**own, "node": self.node, "host": socket.gethostname()}
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                if force:
                    self._pending = record
                return
            if not force and now - self._last < EXCHANGE_EVERY_S:
                return
            self._last = now
            self._thread = threading.Thread(
                target=self._exchange, args=(record,), name="ftsup-nodes", daemon=True
            )
            self._thread.start()

    async def refresh_now(self, own: dict[str, Any], timeout_s: float) -> None:
        """A forced exchange, waited for up to `timeout_s` without blocking the
        event loop (a hung folder leaves the cached view in place)."""
        self.refresh(own, force=True)
        deadline = time.monotonic() + timeout_s
        while self._thread is not None and self._thread.is_alive():
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)

    def _exchange(self, record: dict[str, Any] | None) -> None:
        while record is not None:
            try:
                self._records = exchange(self.output_dir, {**record, "at": time.time()})
                self.error = None
            except OSError as exc:
                self.error = f"{self.output_dir / NODES_DIR}: {exc.strerror or exc}"
            with self._lock:
                record, self._pending = self._pending, None

    def _others(self, job: str, since: float) -> list[dict[str, Any]]:
        """The other nodes' records of this run: same job, written since `since`
        (this node's supervision began), or up to QUIET_GRACE_S before it by a
        node still running (a node waiting in the rendezvous writes rarely)."""
        return [
            record
            for record in self._records
            if record.get("node") != self.node
            and record.get("job") == job
            and _number(record.get("at"))
            >= (since if record.get("state") in ENDED else since - QUIET_GRACE_S)
        ]

    def other_counts(self, job: str, since: float) -> OtherNodes:
        """The highest failure counts the other nodes of this run recorded."""
        others = self._others(job, since)
        return OtherNodes(
            failures=max((_count(r.get("failures")) for r in others), default=0),
            stalled=max((_count(r.get("stalled")) for r in others), default=0),
        )

    def gave_up_elsewhere(self, job: str, since: float) -> dict[str, Any] | None:
        """Another node's record of this run that ended it for good, if any."""
        for record in self._others(job, since):
            if record.get("state") in GAVE_UP:
                return record
        return None

    def to_json(self) -> dict[str, Any]:
        """Every node's last record, with its age; `self` marks this daemon's."""
        now = time.time()
        nodes = [
            {
                **record,
                "age_s": round(max(0.0, now - float(record.get("at") or now)), 1),
                "self": record.get("node") == self.node,
            }
            for record in self._records
        ]
        return {"nodes": nodes, "error": self.error}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


__all__ = ["EXCHANGE_EVERY_S", "GAVE_UP", "NODES_DIR", "NodesView", "exchange", "node_name"]
