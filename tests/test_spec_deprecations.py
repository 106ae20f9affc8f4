"""One name per setting: a renamed key still works, with exactly one warning that
names the file, the line, the old key and the new one, from `ftsup check` (text
and `--json`) and `ftsup start`; retention settings that fight are pointed out."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ftsup.supervisor.spec import RENAMED_KEYS, SpecError, load_spec, parse_spec
from tests.supervisor_harness import Harness

REPO = Path(__file__).resolve().parent.parent

JOB = """\
[job]
name = "demo"
output_dir = "runs/demo"

[command]
argv = ["python", "train.py"]
"""  # 6 lines: after a blank line, [checkpoint] is line 8 and its first key line 9

TRAIN_JOB = """\
[job]
name = "demo"
output_dir = "runs/demo"

[train]
model = "Qwen/Qwen2.5-0.5B"
dataset = "data/sft.jsonl"
"""


def ftsup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftsup.supervisor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def write(folder: Path, text: str) -> Path:
    path = folder / "job.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------ [checkpoint] async


def test_the_old_async_key_is_read_with_one_warning_naming_file_line_and_both_keys(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, JOB + "\n[checkpoint]\nasync = false\n")
    spec = load_spec(path)
    assert spec.checkpoint.async_save is False  # the old key still counts
    assert len(spec.warnings) == 1
    warning = spec.warnings[0]
    assert (warning.file, warning.line, warning.key) == (path, 9, "checkpoint.async")
    text = warning.render()
    assert text.startswith(f"{path}:9: [checkpoint] async: ")
    assert "async_save" in text and "deprecated" in text
    assert warning.hint == "write async_save = false"


def test_the_new_name_works_without_a_warning(tmp_path: Path) -> None:
    spec = parse_spec(JOB + "\n[checkpoint]\nasync_save = false\n", tmp_path / "job.toml")
    assert spec.checkpoint.async_save is False
    assert spec.warnings == ()


def test_old_and_new_name_together_are_refused(tmp_path: Path) -> None:
    text = JOB + "\n[checkpoint]\nasync = true\nasync_save = false\n"
    with pytest.raises(SpecError) as caught:
        parse_spec(text, tmp_path / "job.toml")
    [issue] = caught.value.issues
    assert (issue.line, issue.key) == (9, "checkpoint.async")
    assert "async_save" in issue.message and "both" in issue.message
    assert issue.hint == "keep only async_save = false"


def test_a_bad_value_under_the_old_name_is_reported_at_the_old_key(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(JOB + '\n[checkpoint]\nasync = "yes"\n', tmp_path / "job.toml")
    [issue] = caught.value.issues
    assert (issue.line, issue.key) == (9, "checkpoint.async")
    assert "true or false" in issue.message


def test_check_json_carries_the_warning_and_the_job_is_valid(tmp_path: Path) -> None:
    path = write(tmp_path, JOB + "\n[checkpoint]\nasync = false\n")
    result = ftsup("check", "--json", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["issues"] == []
    assert data["warnings"] == [
        {
            "file": str(path),
            "line": 9,
            "key": "checkpoint.async",
            "message": "async is deprecated, renamed async_save",
            "hint": "write async_save = false",
        }
    ]
    assert data["job"]["checkpoint"]["async_save"] is False
    assert "warnings" not in data["job"]  # the job itself is only its settings


def test_check_prints_the_warning_on_stderr(tmp_path: Path) -> None:
    path = write(tmp_path, JOB + "\n[checkpoint]\nasync = false\n")
    result = ftsup("check", str(path))
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}:9: [checkpoint] async: async is deprecated" in result.stderr
    assert "write async_save = false" in result.stderr
    assert "deprecated" not in result.stdout  # stdout keeps the summary alone


def test_start_prints_the_warning_and_the_job_still_runs(daemon: Harness) -> None:
    job = daemon.toy_job("renamed", "--max-steps", "3", extra="\n[checkpoint]\nasync = false\n")
    line = job.read_text().splitlines().index("async = false") + 1
    result = daemon.cli("start", str(job))
    assert f"warning: {job}:{line}: [checkpoint] async: async is deprecated" in result.stderr
    assert daemon.wait_state("renamed", "finished", "gave_up", "failed")["state"] == "finished"
    # ...and it stays in the job's history for `ftsup events` and the TUI.
    said = daemon.cli_json("events", "renamed")["events"]
    assert any(e["kind"] == "warning" and "async is deprecated" in e["message"] for e in said)


def test_the_examples_use_only_current_names() -> None:
    for path in sorted((REPO / "examples").glob("*.toml")):
        spec = load_spec(path)
        assert spec.warnings == (), (path, [str(w) for w in spec.warnings])
        tables = tomllib.loads(path.read_text())
        old = [(t, k) for (t, k) in RENAMED_KEYS if k in tables.get(t, {})]
        assert old == [], path


# -------------------------------------------------------------- retention


def test_keep_last_against_save_total_limit_in_a_train_job_warns(tmp_path: Path) -> None:
    text = TRAIN_JOB + "save_total_limit = 4\n\n[checkpoint]\nkeep_last = 2\n"
    spec = parse_spec(text, tmp_path / "job.toml")
    [warning] = spec.warnings
    assert (warning.line, warning.key) == (11, "checkpoint.keep_last")
    assert "save_total_limit = 4" in warning.message and "smaller count wins" in warning.message


def test_keep_last_against_the_default_save_total_limit_warns(tmp_path: Path) -> None:
    spec = parse_spec(TRAIN_JOB + "\n[checkpoint]\nkeep_last = 5\n", tmp_path / "job.toml")
    [warning] = spec.warnings
    assert warning.key == "checkpoint.keep_last"
    assert "save_total_limit = 3 (the default)" in warning.message


@pytest.mark.parametrize("key", ["keep_every = 500", 'keep_best = "eval_loss"'])
def test_milestones_in_a_train_job_warn(tmp_path: Path, key: str) -> None:
    spec = parse_spec(TRAIN_JOB + f"\n[checkpoint]\n{key}\n", tmp_path / "job.toml")
    [warning] = spec.warnings
    assert warning.key == f"checkpoint.{key.split()[0]}"
    assert "no effect in a [train] job" in warning.message


@pytest.mark.parametrize(
    "text",
    [
        TRAIN_JOB + "save_total_limit = 4\n\n[checkpoint]\nkeep_last = 4\n",  # they agree
        TRAIN_JOB,  # save_total_limit alone: the [train] job's one retention setting
        JOB + "\n[checkpoint]\nkeep_last = 2\nkeep_every = 100\n",  # the daemon's, for commands
    ],
)
def test_retention_that_agrees_does_not_warn(tmp_path: Path, text: str) -> None:
    assert parse_spec(text, tmp_path / "job.toml").warnings == ()
