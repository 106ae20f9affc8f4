"""The files of one LLaMA-Factory benchmark: tiny model, data set, LF yaml, job.toml.

Everything is built locally (no hub): `ftsup.trainer.tiny` writes a random
Llama and its character tokenizer, the arithmetic rows become an alpaca data
set registered in LF's `dataset_info.json`, and `lf_sft_lora.yaml` is filled in
per run so that every run has its own output folder.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from ftsup.trainer.tiny import arithmetic_rows, build_tiny_model

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "lf_sft_lora.yaml"
DATASET = "ftsup_arithmetic"


@dataclass(frozen=True)
class Recipe:
    """What every run of one benchmark shares (the reference must match exactly)."""

    max_steps: int = 30
    save_steps: int = 10
    seed: int = 42
    hidden: int = 256  # about 0.2 s a step on one CPU thread: a stop lands mid-run
    layers: int = 4
    rows: int = 512


def offline_env(root: Path) -> dict[str, str]:
    """Environment of every LF process: no hub, one thread, private caches."""
    return {
        "HF_HOME": str(root / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@dataclass(frozen=True)
class Workdir:
    root: Path
    recipe: Recipe

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def build(self) -> Workdir:
        """Write the model, tokenizer and data set (seeded: the same bytes each time)."""
        r = self.recipe
        build_tiny_model(self.model, seed=r.seed, hidden=r.hidden, layers=r.layers)
        self.data.mkdir(parents=True, exist_ok=True)
        rows = arithmetic_rows(r.rows, r.seed)
        (self.data / f"{DATASET}.json").write_text(json.dumps(rows))
        info = {DATASET: {"file_name": f"{DATASET}.json"}}  # alpaca columns by default
        (self.data / "dataset_info.json").write_text(json.dumps(info, indent=2))
        return self

    def output_dir(self, run: str) -> Path:
        return self.root / run / "out"

    def lf_yaml(self, run: str) -> Path:
        """The LF config of one run (same recipe, its own output folder)."""
        r = self.recipe
        text = string.Template(TEMPLATE.read_text()).substitute(
            model=self.model,
            dataset=DATASET,
            dataset_dir=self.data,
            output_dir=self.output_dir(run),
            save_steps=r.save_steps,
            max_steps=r.max_steps,
            seed=r.seed,
        )
        path = self.root / run / "lf.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def lf_argv(self, venv: Path, run: str) -> list[str]:
        return [str(venv / "bin" / "llamafactory-cli"), "train", str(self.lf_yaml(run))]

    def job_file(self, venv: Path, run: str, *, instrument: bool) -> Path:
        """A `[command]` job running `llamafactory-cli train` under ftsup."""
        env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in offline_env(self.root).items())
        lines = [
            "[job]",
            f"name = {json.dumps(run)}",
            f"output_dir = {json.dumps(str(self.output_dir(run)))}",
            "",
            "[command]",
            f"argv = {json.dumps(self.lf_argv(venv, run))}",
            f"cwd = {json.dumps(str(self.root / run))}",
            f"env = {{ {env} }}",
            'resume_args = ["resume_from_checkpoint={checkpoint}"]',
        ]
        if not instrument:
            lines.append("instrument = false")
        lines += ["", "[restart]", 'backoff = "0.1s"', 'backoff_max = "1s"', 'stop_grace = "2m"']
        path = self.root / run / "job.toml"
        path.write_text("\n".join(lines) + "\n")
        return path
