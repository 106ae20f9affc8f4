"""`ftsup ckpt ...` as a real subprocess, through a parser built with register()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ftsup.supervisor.cli import output

from . import builders
from .conftest import Factory

# The command group as `ftsup` will mount it (main.py registers the module).
MAIN = """
import argparse, sys
from ftsup.supervisor.cli.ckpt_cmd import register
parser = argparse.ArgumentParser(prog="ftsup")
register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def ftsup(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MAIN, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_verify_a_valid_checkpoint(pristine: dict[str, Path]) -> None:
    proc = ftsup("ckpt", "verify", pristine["ftsup"] / "checkpoint-4", "--deep", "--json")
    assert proc.returncode == output.EXIT_OK, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True
    [report] = data["checkpoints"]
    assert report["format"] == "ftsup" and report["step"] == 4 and report["resumable"]


def test_verify_an_output_folder_with_a_broken_checkpoint(output_dir: Factory) -> None:
    out = output_dir("hf")
    builders.truncate(out / "checkpoint-6" / "optimizer.pt")
    proc = ftsup("ckpt", "verify", out)
    assert proc.returncode == output.EXIT_FAILED
    assert "optimizer.pt truncated: central directory missing" in proc.stdout
    data = json.loads(ftsup("ckpt", "verify", out, "--json").stdout)
    assert [c["valid"] for c in data["checkpoints"]] == [True, True, False]


def test_verify_deep_sees_a_flipped_bit(output_dir: Factory) -> None:
    out = output_dir("hf")
    builders.flip_bit(out / "checkpoint-2" / "optimizer.pt")
    assert ftsup("ckpt", "verify", out / "checkpoint-2").returncode == output.EXIT_OK
    proc = ftsup("ckpt", "verify", out / "checkpoint-2", "--deep")
    assert proc.returncode == output.EXIT_FAILED
    assert "CRC mismatch" in proc.stdout


def test_verify_single_checkpoint_expects_the_manifest_its_siblings_have(
    output_dir: Factory,
) -> None:
    out = output_dir("ftsup")
    (out / "checkpoint-6" / "ftsup-manifest.json").unlink()
    proc = ftsup("ckpt", "verify", out / "checkpoint-6")
    assert proc.returncode == output.EXIT_FAILED
    assert "ftsup-manifest.json missing" in proc.stdout


def test_verify_world_size_option(pristine: dict[str, Path]) -> None:
    proc = ftsup("ckpt", "verify", pristine["hf2"] / "checkpoint-2", "--world-size", "4")
    assert proc.returncode == output.EXIT_FAILED
    assert "rng_state_2.pth missing (world size 4)" in proc.stdout


def test_verify_missing_path(tmp_path: Path) -> None:
    proc = ftsup("ckpt", "verify", tmp_path / "nope")
    assert proc.returncode == output.EXIT_NOT_FOUND
    assert "not a folder" in proc.stderr


def test_ls_quarantine_restore(output_dir: Factory) -> None:
    out = output_dir("hf")
    builders.zero(out / "checkpoint-6" / "scheduler.pt")
    table = ftsup("ckpt", "ls", out)
    assert table.returncode == output.EXIT_OK
    assert "scheduler.pt is empty (0 bytes)" in table.stdout and "← resume" in table.stdout
    listing = json.loads(ftsup("ckpt", "ls", out, "--json").stdout)
    assert listing["resume_from"] == str(out / "checkpoint-4")
    assert [c["step"] for c in listing["checkpoints"]] == [2, 4, 6]

    moved = json.loads(
        ftsup("ckpt", "quarantine", out / "checkpoint-6", "--reason", "bad sched", "--json").stdout
    )
    assert moved["to"] == str(out / "checkpoint-6.invalid-bad-sched")
    listing = json.loads(ftsup("ckpt", "ls", out, "--json").stdout)
    assert [c["step"] for c in listing["checkpoints"]] == [2, 4]
    assert listing["quarantined"] == [
        {"path": moved["to"], "step": 6, "reason": "bad sched"},
    ]
    assert "bad sched" in ftsup("ckpt", "ls", out).stdout

    (out / "checkpoint-6").mkdir()
    refused = ftsup("ckpt", "restore", moved["to"])
    assert refused.returncode == output.EXIT_REFUSED and "exists" in refused.stderr
    (out / "checkpoint-6").rmdir()
    restored = ftsup("ckpt", "restore", moved["to"])
    assert restored.returncode == output.EXIT_OK
    assert (out / "checkpoint-6" / "trainer_state.json").is_file()


def test_quarantine_refuses_other_names_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    assert ftsup("ckpt", "quarantine", tmp_path / "data", "--reason", "x").returncode == (
        output.EXIT_BAD_INPUT
    )
    missing = ftsup("ckpt", "quarantine", tmp_path / "checkpoint-1", "--reason", "x")
    assert missing.returncode == output.EXIT_NOT_FOUND
    assert ftsup("ckpt", "restore", tmp_path / "checkpoint-1").returncode == output.EXIT_BAD_INPUT


def test_ls_empty_and_missing(tmp_path: Path) -> None:
    proc = ftsup("ckpt", "ls", tmp_path)
    assert proc.returncode == output.EXIT_OK and "no checkpoints" in proc.stdout
    assert ftsup("ckpt", "ls", tmp_path / "nope").returncode == output.EXIT_NOT_FOUND
