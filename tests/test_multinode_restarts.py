"""A multi-node job's restart limits are the job's, not each node's (issue 17).

Two daemons stand in for two nodes; each runs a cheap `[command]` job with
`[launch] nnodes = 2` (a multi-node job to the daemons; no torchrun: what is
tested is how the nodes count, through their records in the shared folder).
Each attempt's script waits at a gate the test controls, so the order of
events is fixed whatever the machine's speed:

* `count` (max_restarts = 2): the second node joins late, when the first has
  failed twice and runs its third attempt; then both fail together. Counted
  alone, the second node would restart twice more; counted with the first
  node's failures, the job is over its limit within at most one more attempt.
* `ended`: the first node fails with a configuration error (exit 2, never
  restarted); the second node's first failure then ends it too, naming the
  node that gave up, instead of relaunching a launcher that would wait for that
  node for ever.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.supervisor_harness import Harness, wait_for

ENDED = ("finished", "failed", "gave_up", "stopped")
PORTS = {"count": 29501, "ended": 29502}  # never listened on: no torchrun here
# Counts its attempts in COUNT; exits at once with FAIL_CODE while the count is
# <= FAIL_FIRST; later attempts wait for the file RELEASE, then exit 1.
SCRIPT = """
import os, sys, time
count, release = sys.argv[1], sys.argv[2]
fail_first, fail_code = int(sys.argv[3]), int(sys.argv[4])
n = (int(open(count).read()) if os.path.exists(count) else 0) + 1
open(count + ".new", "w").write(str(n))
os.replace(count + ".new", count)  # whole: the test polls this file
if n <= fail_first:
    sys.exit(fail_code)
while not os.path.exists(release):
    time.sleep(0.05)
sys.exit(1)
"""


@dataclass
class Nodes:
    first: Harness
    second: Harness

    def gate(self, job: str) -> Path:
        return self.first.work / f"{job}.release"


def job_file(node: Harness, job: str, output: Path, script_args: list[str], port: int) -> Path:
    argv = [sys.executable, "-c", SCRIPT, *script_args]
    path = node.work / f"{job}.toml"
    path.write_text(
        f'[job]\nname = "{job}"\noutput_dir = "{output}"\n\n'
        f"[command]\nargv = {json.dumps(argv)}\ninstrument = false\n\n"
        '[restart]\nmax_restarts = 2\ncrash_loop = 10\nbackoff = "0.1s"\nbackoff_max = "0.2s"\n\n'
        f'[launch]\nnnodes = 2\nrdzv_endpoint = "127.0.0.1:{port}"\n'
    )
    return path


def start(node: Harness, nodes: Nodes, job: str, fail_first: int, fail_code: int) -> None:
    counter = node.work / f"{job}.count"
    args = [str(counter), str(nodes.gate(job)), str(fail_first), str(fail_code)]
    output = nodes.first.work / f"{job}-out"
    node.cli("start", str(job_file(node, job, output, args, PORTS[job])))


def attempts_of(node: Harness, job: str) -> int:
    count = node.work / f"{job}.count"
    return int(count.read_text()) if count.exists() else 0


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    pair = Nodes(Harness(), Harness())
    try:
        for node in (pair.first, pair.second):
            node.start_daemon()
        yield pair
    except BaseException:
        for node in (pair.first, pair.second):
            print(f"--- daemon log ---\n{node.daemon_log()[-3000:]}")
        raise
    finally:
        for node in (pair.first, pair.second):
            node.cleanup()


def final(node: Harness, job: str) -> dict[str, Any]:
    return node.wait_state(job, *ENDED, timeout=60)


def test_the_limit_counts_the_failures_every_node_saw(nodes: Nodes) -> None:
    start(nodes.first, nodes, "count", fail_first=2, fail_code=1)
    first = wait_for(
        lambda: nodes.first.status("count") if attempts_of(nodes.first, "count") == 3 else None,
        60,
        0.1,
        "the first node to fail twice and run a third attempt",
    )
    assert first["restarts"] == 2
    start(nodes.second, nodes, "count", fail_first=0, fail_code=1)  # joins late
    wait_for(lambda: attempts_of(nodes.second, "count") == 1, 60, 0.1, "the second node to run")
    nodes.gate("count").touch()  # both running attempts fail now
    assert final(nodes.first, "count")["state"] == "gave_up"
    second = final(nodes.second, "count")
    assert second["state"] == "gave_up", second
    assert attempts_of(nodes.second, "count") <= 2  # alone it would have run 3
    assert "counted on all nodes" in second["reason"], second["reason"]


def test_a_node_that_gave_up_ends_the_run_on_the_others(nodes: Nodes) -> None:
    start(nodes.second, nodes, "ended", fail_first=0, fail_code=1)  # waits at the gate
    wait_for(lambda: attempts_of(nodes.second, "ended") == 1, 60, 0.1, "the second node to run")
    start(nodes.first, nodes, "ended", fail_first=1, fail_code=2)
    first = final(nodes.first, "ended")
    assert first["state"] == "failed" and "configuration error" in first["reason"], first
    nodes.gate("ended").touch()
    second = final(nodes.second, "ended")
    assert attempts_of(nodes.second, "ended") == 1  # alone it would restart twice
    assert second["state"] == "gave_up", second
    assert "gave up: configuration error" in second["reason"], second["reason"]
