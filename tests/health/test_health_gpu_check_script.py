"""bench/gpu_check.py end to end, with the NVML double standing in for a GPU machine."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import pytest

from tests.health.nvml_double import FakeGpu, FakeNvml

SCRIPT = Path(__file__).parents[2] / "bench" / "gpu_check.py"


def _script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_on_a_machine_with_gpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNvml([FakeGpu(), FakeGpu(compute_capability=(7, 5))], xids=[(0, 13)])
    out = tmp_path / "gpu_check.json"
    assert _script().check(2.0, out, nvml=fake.module) == 0
    report = json.loads(out.read_text())
    assert report["status"]["message"].startswith("GPU monitor on: 2 GPUs")
    assert report["status"]["xid_events"] is True
    assert report["checks"] == {"check_devices": [], "supports_bf16": {"0": True, "1": False}}
    assert [e["xid"] for e in report["events"]] == [13]
    assert len(report["series"]["0"]) >= 2 and "util_gpu" in report["series"]["0"][-1]
    assert report["reading"]["gpus"][1]["compute_capability"] == "7.5"
    # This machine has no CUDA: the load child says so, or (with a GPU) it ran and finished.
    load = report["load"]
    assert load["ran"] is False or load["diagnosis"]["kind"] == "finished"
    assert report["stopped_status"]["message"] == "GPU monitor off: stopped"
    assert fake.initialized == 0
    assert "GPU 0:" in capsys.readouterr().out


def test_report_without_nvml(tmp_path: Path) -> None:
    fake = FakeNvml([], init_error=12)  # NVML_ERROR_LIBRARY_NOT_FOUND
    out = tmp_path / "gpu_check.json"
    assert _script().check(2.0, out, nvml=fake.module) == 1
    report = json.loads(out.read_text())
    assert report["status"]["message"] == (
        "GPU monitor off: NVML library not found (is the NVIDIA driver installed?)"
    )
