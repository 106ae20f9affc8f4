"""Every node of a multi-node job in one view, through the shared output folder.

Each node's daemon supervises only its own launcher, so no daemon knows the
others' state by itself. The output folder is the one thing every node shares
(the job writes its checkpoints there), so each daemon keeps a small record of
its part in `<output_dir>/.ftsup-nodes/<node>.json` (host, state, step,
attempt, what it waits for, when written) and reads the others' records from
there: `ftsup status JOB` on any node then lists every node. A record is a
report, not a lease: a node that stopped writing is shown with the age of its
last record, never judged dead from it.

The folder is a user path (NFS may hang): every exchange runs in its own
thread, one at a time, and the event loop only ever reads the cached result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ftsup.supervisor.atomicio import write_json_atomic
from ftsup.supervisor.userfiles import NotRegularFile, read_bytes

NODES_DIR = ".ftsup-nodes"
EXCHANGE_EVERY_S = 5.0  # at most one write and read of the folder per interval
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
        self.error: str | None = None  # the last exchange's failure, shown with the view

    def refresh(self, own: dict[str, Any], *, force: bool = False) -> None:
        """Start an exchange unless one runs or the last was too recent."""
        now = time.monotonic()
        if self._thread is not None and self._thread.is_alive():
            return
        if not force and now - self._last < EXCHANGE_EVERY_S:
            return
        self._last = now
        record = {**own, "node": self.node, "host": socket.gethostname(), "at": time.time()}
        self._thread = threading.Thread(
            target=self._exchange, args=(record,), name="ftsup-nodes", daemon=True
        )
        self._thread.start()

    def _exchange(self, record: dict[str, Any]) -> None:
        try:
            self._records = exchange(self.output_dir, record)
            self.error = None
        except OSError as exc:
            self.error = f"{self.output_dir / NODES_DIR}: {exc.strerror or exc}"

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


__all__ = ["EXCHANGE_EVERY_S", "NODES_DIR", "NodesView", "exchange", "node_name"]
