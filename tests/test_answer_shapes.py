"""Same question, same answer: what the CLI prints with --json and what the daemon
answers over the socket have one shape (issue 13), compared on the same folder."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from ftsup.supervisor.cli import gpus_cmd
from ftsup.supervisor.client import Client
from ftsup.supervisor.daemon.app import Daemon
from ftsup.supervisor.paths import Layout
from tests.health.nvml_double import FakeGpu, FakeNvml, GiB
from tests.supervisor_harness import Harness, wait_for


def _daemon(h: Harness, kind: str, **args: Any) -> dict[str, Any]:
    with Client(h.runtime_dir / "ftsup.sock") as client:
        return dict(client.request(kind, **args))


def test_ckpt_ls_and_the_daemon_list_checkpoints_alike(daemon: Harness) -> None:
    job = daemon.toy_job("shapes", "--max-steps", "12", "--save-steps", "3", "--step-time", "0.05")
    out = daemon.work / "shapes"
    daemon.cli("start", str(job))
    daemon.wait_state("shapes", "finished", "gave_up", "failed")
    # One quarantined folder (with its reason), one invalid, one that resumes.
    daemon.cli("ckpt", "quarantine", str(out / "checkpoint-3"), "--reason", "bad bytes")
    newest = out / "checkpoint-12"
    victim = next(p for p in sorted(newest.iterdir()) if p.is_file() and p.stat().st_size > 0)
    victim.write_bytes(b"")

    by_folder = daemon.cli_json("ckpt", "ls", str(out))
    by_name = daemon.cli_json("ckpt", "ls", "shapes")
    answer = _daemon(daemon, "checkpoints", job="shapes")

    assert answer == by_folder == by_name
    assert set(answer) == {"output_dir", "checkpoints", "resume_from", "quarantined"}
    assert answer["resume_from"] == str(out / "checkpoint-9")
    assert [(c["step"], c["valid"], c["resume_candidate"]) for c in answer["checkpoints"]] == [
        (6, True, False),
        (9, True, True),
        (12, False, False),
    ]
    assert answer["quarantined"] == [
        {"path": str(out / "checkpoint-3.invalid-bad-bytes"), "step": 3, "reason": "bad bytes"}
    ]
    json.dumps(answer)  # plain JSON all the way down
    assert Path(answer["output_dir"]) == out


def _comparable(reading: dict[str, Any]) -> dict[str, Any]:
    """A reading without what depends on when and how long it was read: the sample
    time, the sample count and the series (one point from the CLI, a ring from the
    daemon's monitor; the double's values do not change, so only the newest is kept)
    and `status`, the line that says who read it."""
    gpus = []
    for gpu in reading["gpus"]:
        latest = gpu["latest"]
        gpus.append(
            {
                **gpu,
                "latest": None if latest is None else {k: v for k, v in latest.items() if k != "t"},
                "samples": min(gpu["samples"], 1),
                "series": {k: v[-1:] for k, v in gpu["series"].items()},
            }
        )
    return {**{k: v for k, v in reading.items() if k != "status"}, "gpus": gpus}


def _keys(value: Any, where: str = "") -> set[str]:
    """Every key path of a JSON value (lists: their items' keys, merged)."""
    if isinstance(value, dict):
        return {f"{where}.{k}" for k in value} | {
            p for k, v in value.items() for p in _keys(v, f"{where}.{k}")
        }
    if isinstance(value, list):
        return {p for item in value for p in _keys(item, f"{where}[]")}
    return set()


def test_ftsup_gpus_and_the_daemon_read_gpus_alike(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    v100 = FakeGpu(
        name="Tesla V100-SXM2-32GB",
        uuid="GPU-second",
        memory_total=32 * GiB,
        compute_capability=(7, 0),
        not_supported={"nvmlDeviceGetRemappedRows"},
    )
    fake = FakeNvml([FakeGpu(), v100, FakeGpu(uuid="GPU-third", lost=True)])
    daemon = Daemon(Layout.from_env(harness.state_dir, harness.runtime_dir), nvml=fake.module)
    thread = threading.Thread(target=lambda: asyncio.run(daemon.run()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: harness.cli("ls", check=False).returncode == 0, 20, what="the daemon")
        answer = wait_for(
            lambda: (r := _daemon(harness, "gpus"))["gpus"][0]["samples"] >= 1 and r,
            20,
            what="a first sample",
        )
        parser = argparse.ArgumentParser(prog="ftsup")
        gpus_cmd.register(parser.add_subparsers(dest="command"))
        assert gpus_cmd.run(parser.parse_args(["gpus", "--json"]), nvml=fake.module) == 0
        printed = json.loads(capsys.readouterr().out)
    finally:
        with Client(harness.runtime_dir / "ftsup.sock") as client:
            client.request("shutdown")
        thread.join(20)

    assert _keys(printed) == _keys(answer)
    assert _comparable(printed) == _comparable(answer)
    assert answer["available"] is True and answer["driver"] == "550.54.15"
    assert answer["status"].startswith("GPU monitor on: ")
    assert printed["status"] == "3 GPUs, driver 550.54.15"
    h100, second, lost = answer["gpus"]
    assert (h100["healthy"], h100["util"], h100["latest"]["util_gpu"]) == (True, 97, 97)
    assert "remap_pending" not in second["latest"]  # not supported: absent in both
    assert (lost["index"], lost["healthy"], lost["latest"]) == (2, False, None)
    assert lost["unhealthy_reason"] == "GPU is lost"
