"""The command-job bootstrap (trainer/bootstrap/sitecustomize.py), run in real
Python processes the way the daemon runs a command: its folder first on PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ftsup.supervisor.contract import ENV_PROGRESS_FILE, PROGRESS_INSTRUMENT_FAILED
from ftsup.supervisor.daemon.launcher import bootstrap_dir

# Everything a Python program can see of its surroundings, and something on stderr.
PROBE = """
import json, os, sys
import sitecustomize
print(json.dumps({
    "argv": sys.argv,
    "path": sys.path,
    "env": {k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    # sitecustomize: ours (or, when it shadows one, the user's) is imported either way
    "modules": sorted(m for m in sys.modules if m != "sitecustomize"),
    "user_site": getattr(sitecustomize, "USER_SITE_RAN", False),
}))
print("to stderr", file=sys.stderr)
sys.exit(7)
"""


def run_probe(tmp_path: Path, *, bootstrap: bool) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    user_site = tmp_path / "user-site"  # the user's own sitecustomize, on their PYTHONPATH
    user_site.mkdir(exist_ok=True)
    (user_site / "sitecustomize.py").write_text("USER_SITE_RAN = True\n")
    path = [str(user_site)]
    if bootstrap:
        path.insert(0, str(bootstrap_dir()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, str(script), "an", "argument"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_process_that_never_imports_transformers_runs_as_without_it(tmp_path: Path) -> None:
    plain = run_probe(tmp_path, bootstrap=False)
    instrumented = run_probe(tmp_path, bootstrap=True)
    assert (instrumented.returncode, plain.returncode) == (7, 7)
    assert instrumented.stderr == plain.stderr == "to stderr\n"
    seen, expected = json.loads(instrumented.stdout), json.loads(plain.stdout)
    assert seen == expected  # argv, sys.path, environment, loaded modules
    assert seen["user_site"] is True  # the sitecustomize it shadows still ran
    assert str(bootstrap_dir()) not in seen["path"]


TRAINS_AFTER_A_FOREIGN_FTSUP = """
import sys
sys.path.insert(0, sys.argv[1])
import ftsup  # the user's own, unrelated module of that name
import torch
from transformers import Trainer, TrainingArguments

class Data(torch.utils.data.Dataset):
    def __len__(self): return 4
    def __getitem__(self, i): return {"x": torch.tensor([float(i)]), "labels": torch.tensor([1.0])}

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
    def forward(self, x, labels):
        return {"loss": ((x[:, 0] * self.w - labels) ** 2).mean()}

args = TrainingArguments(output_dir=sys.argv[2], max_steps=3, report_to=[], use_cpu=True,
                         save_strategy="no", disable_tqdm=True, per_device_train_batch_size=2)
trainer = Trainer(model=Model(), args=args, train_dataset=Data())
trainer.train()
print("trained", trainer.state.global_step)
"""


def test_a_failure_to_instrument_is_reported_and_training_goes_on(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "ftsup.py").write_text("NAME = 'not ftsup'\n")
    script = tmp_path / "train.py"
    script.write_text(TRAINS_AFTER_A_FOREIGN_FTSUP)
    progress = tmp_path / "progress.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": str(bootstrap_dir()),
        ENV_PROGRESS_FILE: str(progress),
    }
    result = subprocess.run(
        [sys.executable, str(script), str(foreign), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "trained 3"
    assert "ftsup: instrumentation failed" in result.stderr
    (record,) = [json.loads(line) for line in progress.read_text().splitlines()]
    assert record["event"] == PROGRESS_INSTRUMENT_FAILED
    assert "ftsup.trainer" in record["error"]  # what could not be loaded, named
