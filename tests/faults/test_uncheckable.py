""" "Could not check" is never "corrupt" (issue 12, defect 2, checkpoint part).

Real Trainer checkpoints, real faults: a process out of file descriptors
(RLIMIT_NOFILE lowered, every descriptor taken) and a process that may not read
a file (uid 65534 against a root-owned mode-000 `optimizer.pt`). Each child
calls exactly what the daemon calls before a launch, `manager.select_resume`,
and reports what happened; no valid folder may be renamed `*.invalid-*`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import builders

NOBODY = 65534

CHILD = textwrap.dedent("""\
    import json, os, resource, sys
    from pathlib import Path
    from ftsup.supervisor.spec import parse_spec
    from ftsup.supervisor.daemon.manager import select_resume
    try:
        from ftsup.supervisor.resume import CheckpointsUncheckable
    except ImportError:  # the code before the fix had no such outcome
        class CheckpointsUncheckable(Exception):
            reason = ""
    from ftsup.supervisor.checkpoints.validate import validate_checkpoint

    spec_path, mode = Path(sys.argv[1]), sys.argv[2]
    spec = parse_spec(spec_path.read_text(), spec_path)
    held = []

    def exhaust(*_args):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass

    if mode in ("nobody", "watch"):
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    if mode == "emfile":
        exhaust()
    try:
        if mode == "watch":  # the daemon's watcher, as uid 65534
            import threading
            from ftsup.supervisor.checkpoints.watch import CheckpointWatcher
            reports, problems, done = [], [], threading.Event()
            def on_report(report):
                reports.append([report.path.name, report.valid, report.reason])
                done.set()
            def on_problem(message):
                problems.append(message)
                if sum("checkpoint-" in p for p in problems) >= 3:
                    done.set()
            watcher = CheckpointWatcher(spec.output_dir, on_report, on_problem=on_problem,
                                        mode="polling", settle=0.2, report_existing=True)
            watcher.start()
            done.wait(120)
            watcher.stop()
            out = {"result": "watched", "reports": reports, "problems": problems}
        elif mode == "emfile-after-listing":  # listing works, every read fails
            report = validate_checkpoint(Path(sys.argv[3]), on_listed=exhaust)
            out = {"result": "report", "checked": report.checked, "valid": report.valid,
                   "reason": report.reason}
        else:
            point = select_resume(spec)
            out = {"result": "chose", "path": str(point.path),
                   "quarantined": [str(p) for p, _ in point.quarantined]}
    except CheckpointsUncheckable as exc:
        out = {"result": "uncheckable", "reason": exc.reason}
    except Exception as exc:
        out = {"result": type(exc).__name__, "reason": str(exc)}
    for fd in held:
        os.close(fd)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real Trainer run: checkpoint-2, -4 and -6, all valid."""
    out = tmp_path_factory.mktemp("trained") / "out"
    builders.train(out)
    return out


@pytest.fixture
def world() -> Iterator[Path]:
    """A folder that uid 65534 can reach (pytest's own tmp folders are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="ftsup-unchk", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def job_file(root: Path, output_dir: Path) -> Path:
    path = root / "job.toml"
    path.write_text(
        textwrap.dedent(f"""\
            [job]
            name = "j"
            output_dir = "{output_dir}"

            [command]
            argv = ["true"]
            """)
    )
    path.chmod(0o644)
    return path


def run_child(job: Path, mode: str, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(job), mode, *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def make_unreadable(out: Path) -> None:
    """Everything belongs to uid 65534 except each optimizer.pt: root's, mode 000."""
    for root, dirs, files in os.walk(out):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), NOBODY, NOBODY)
    os.chown(out, NOBODY, NOBODY)
    for optimizer in out.glob("checkpoint-*/optimizer.pt"):
        os.chown(optimizer, 0, 0)  # readable by root only: EACCES for uid 65534
        optimizer.chmod(0)


def folder_names(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir())


def test_descriptor_exhaustion_waits_and_quarantines_nothing(trained: Path, world: Path) -> None:
    out = world / "out"
    shutil.copytree(trained, out)
    before = folder_names(out)
    seen = run_child(job_file(world, out), "emfile")
    assert seen["result"] == "uncheckable", seen
    assert "Too many open files" in seen["reason"]
    assert folder_names(out) == before
    assert not list(out.glob("*.invalid-*"))


def test_reads_failing_after_the_listing_are_not_corruption(trained: Path, world: Path) -> None:
    """The issue's case: folders listed, then every open fails with EMFILE."""
    out = world / "out"
    shutil.copytree(trained, out)
    seen = run_child(job_file(world, out), "emfile-after-listing", str(out / "checkpoint-6"))
    assert seen["result"] == "report", seen
    assert seen["checked"] is False and seen["valid"] is False
    assert seen["reason"].startswith("could not check:") and "Too many open files" in seen["reason"]


def test_unreadable_files_are_not_quarantined(trained: Path, world: Path) -> None:
    out = world / "out"
    shutil.copytree(trained, out)
    make_unreadable(out)
    before = folder_names(out)
    seen = run_child(job_file(world, out), "nobody")
    assert seen["result"] == "uncheckable", seen
    assert "checkpoint-6" in seen["reason"] and "Permission denied" in seen["reason"]
    assert folder_names(out) == before
    assert not list(out.glob("*.invalid-*"))


def test_the_watcher_reports_no_verdict_on_unreadable_files(trained: Path, world: Path) -> None:
    """The live watcher (what `job_checkpoints` records) says "could not check",
    never "invalid", when a file cannot be read."""
    out = world / "out"
    shutil.copytree(trained, out)
    make_unreadable(out)
    seen = run_child(job_file(world, out), "watch")
    assert seen["result"] == "watched", seen
    assert seen["reports"] == [], seen["reports"]  # no verdict, valid or not
    unchecked = [p for p in seen["problems"] if "could not check" in p]
    assert {p.split(":")[0] for p in unchecked} == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert all("Permission denied" in p for p in unchecked)
    assert not list(out.glob("*.invalid-*"))
