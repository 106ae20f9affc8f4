"""The trainer↔supervisor contract is defined once (`ftsup.supervisor.contract`).

The daemon, CLI and TUI never load the trainer's package (nor torch), the
built-in trainer exits with the contract's codes, and no other module spells an
`FTSUP_*` environment name itself.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from ftsup.supervisor import contract
from ftsup.supervisor.checkpoints import discovery
from ftsup.supervisor.health.diagnosis import FailureKind, classify_failure
from ftsup.supervisor.policy import AttemptOutcome
from ftsup.trainer import checkpointing

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("supervisor", "trainer", "tui")
FORBIDDEN = ("ftsup.trainer", "torch", "transformers", "peft")


def test_daemon_cli_and_tui_load_no_trainer_module() -> None:
    """The daemon's room has no door to the trainer's: `ftsup.trainer.launch` used to be
    imported by `daemon/standby.py`, loading `ftsup.trainer` into the daemon."""
    code = (
        "import sys\n"
        "import ftsup.supervisor.daemon.app, ftsup.supervisor.cli.main, ftsup.tui.app\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "loaded = sorted(m for m in sys.modules\n"
        "                if any(m == f or m.startswith(f + '.') for f in forbidden))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "", f"loaded by daemon/CLI/TUI: {result.stdout.strip()}"


def test_trainer_bad_configuration_exits_with_the_contract_code(tmp_path: Path) -> None:
    """The real trainer entry point, given a configuration it cannot read, exits with
    the code the daemon reads as "never restart"; and the daemon's side judges it so."""
    broken = tmp_path / "train.json"
    broken.write_text('{"train": "not a table"}')
    for config in (tmp_path / "missing.json", broken):
        result = subprocess.run(
            [sys.executable, "-m", "ftsup.trainer", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == contract.EXIT_CONFIG, (config, result.stderr)
        assert "ftsup trainer: error:" in result.stderr
    diagnosis = classify_failure(contract.EXIT_CONFIG, None, "")
    assert diagnosis.kind == FailureKind.CONFIG_ERROR and not diagnosis.retry
    stopped = AttemptOutcome(contract.EXIT_STOPPED, None, start_step=0, last_step=5)
    assert not stopped.is_failure


def test_daemon_and_trainer_read_checkpoint_folders_alike(tmp_path: Path) -> None:
    """One pattern, anchored at both ends: `checkpoint-8\\n` is no checkpoint to either side."""
    for name in ("checkpoint-3", "checkpoint-12", "checkpoint-8\n", "checkpoint-x", "ckpt-4"):
        (tmp_path / name).mkdir()
    assert contract.checkpoint_step("checkpoint-8\n") is None
    assert contract.checkpoint_step(tmp_path / contract.checkpoint_name(12)) == 12
    assert [step for step, _ in checkpointing.list_checkpoints(tmp_path)] == [3, 12]
    listed = [p.name for p in discovery.list_checkpoints(tmp_path)]
    assert listed == ["checkpoint-3", "checkpoint-12"]


def _python_files() -> Iterator[Path]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if path != REPO / "supervisor" / "contract.py":
                yield path


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (allowed to name variables)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
        ):
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def ftsup_literals(source: str) -> list[tuple[int, str]]:
    """(line, value) of every string literal that starts with `FTSUP_`, docstrings aside."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("FTSUP_")
        and id(node) not in docstrings
    ]


def test_the_literal_check_sees_keys_and_arguments_not_docstrings() -> None:
    source = (
        '"""Reads FTSUP_JOB."""\n'
        "import os\n"
        "def f():\n"
        '    """FTSUP_X in a docstring."""\n'
        '    return os.environ.get("FTSUP_JOB"), {"FTSUP_ATTEMPT": 1}  # "FTSUP_ comment"\n'
    )
    assert [value for _, value in ftsup_literals(source)] == ["FTSUP_JOB", "FTSUP_ATTEMPT"]


# Runs at every start-up of a command job's Python: it must not import ftsup then,
# so it spells out the names it uses (checked against the contract below).
BOOTSTRAP = REPO / "trainer" / contract.BOOTSTRAP_DIR_NAME / "sitecustomize.py"


def test_only_the_contract_names_ftsup_environment_variables() -> None:
    """Each `FTSUP_*` name is written once, in contract.py; everyone else imports it."""
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {value!r}"
        for path in _python_files()
        if path != BOOTSTRAP
        for line, value in ftsup_literals(path.read_text())
    ]
    assert offenders == []


def test_the_bootstraps_spelled_out_names_are_the_contracts() -> None:
    source = BOOTSTRAP.read_text()
    env_names = {value for _, value in ftsup_literals(source)}
    assert env_names == {contract.ENV_PROGRESS_FILE}
    literals = {
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert contract.PROGRESS_INSTRUMENT_FAILED in literals
    assert "transformers.trainer" in literals
