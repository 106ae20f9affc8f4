"""`ftsup gpus` against the NVML double, and against this machine's real NVML."""

from __future__ import annotations

import argparse
import io
import json

import pynvml
import pytest
from rich.console import Console

from ftsup.supervisor.cli import gpus_cmd
from tests.health.nvml_double import FakeGpu, FakeNvml, GiB


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ftsup")
    gpus_cmd.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["gpus", *argv])


def _machine() -> FakeNvml:
    v100 = FakeGpu(
        name="Tesla V100-SXM2-32GB",
        memory_total=32 * GiB,
        compute_capability=(7, 0),
        not_supported={"nvmlDeviceGetRemappedRows"},
        retired_pending=pynvml.NVML_FEATURE_ENABLED,
        ecc={(pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC): 2},
        clock_events=pynvml.nvmlClocksEventReasonHwThermalSlowdown,
    )
    return FakeNvml([FakeGpu(), v100, FakeGpu(lost=True)])


def test_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpus_cmd.run(_args("--json"), nvml=_machine().module) == 0
    reading = json.loads(capsys.readouterr().out)
    assert reading["available"] is True and reading["driver"] == "550.54.15"
    assert reading["reason"] is None and reading["status"] == "3 GPUs, driver 550.54.15"
    h100, v100, lost = reading["gpus"]
    assert h100["name"] == "NVIDIA H100 80GB HBM3" and h100["latest"]["util_gpu"] == 97
    assert (h100["util"], h100["temp"], h100["series"]["util"]) == (97, 67, [97])
    assert v100["latest"]["ecc_volatile_uncorrected"] == 2
    assert v100["latest"]["retired_pages_pending"] is True
    assert "remap_pending" not in v100["latest"]  # not supported: absent
    assert v100["latest"]["clock_events"] == ["hw_thermal_slowdown"]
    assert (lost["index"], lost["healthy"], lost["unhealthy_reason"]) == (2, False, "GPU is lost")
    assert lost["latest"] is None and lost["samples"] == 0


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    text = io.StringIO()
    console = Console(width=160, file=text, color_system=None)
    console.print(gpus_cmd.gpus_table(gpus_cmd.read_gpus(_machine().module)))
    rows = [" ".join(row.split()) for row in text.getvalue().splitlines()]
    assert rows[:4] == [
        "driver 550.54.15",
        "GPU NAME UTIL MEM GiB TEMP POWER W SM MHz THROTTLE ECC v/a REMAP REPLAY",
        "0 H100 80GB HBM3 97% 61.0/80 67°C 612/700 1755 sw_power_cap 0/0 ok 0",
        "1 Tesla V100-SXM2-32GB 97% 61.0/32 67°C 612/700 1755 hw_thermal_slowdown 2/0 pending 0",
    ]
    assert rows[4] == "2 GPU is lost" + " -" * 9
    # `ftsup gpus` prints the same table (narrow terminals wrap it).
    assert gpus_cmd.run(_args(), nvml=_machine().module) == 0
    assert "61.0/80" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (
            pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
            "NVML library not found (is the NVIDIA driver installed?)",
        ),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVIDIA driver not loaded"),
    ],
)
def test_no_gpu_is_an_answer(code: int, reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNvml([], init_error=code)
    assert gpus_cmd.run(_args(), nvml=fake.module) == 0
    assert capsys.readouterr().out == f"no NVIDIA GPU: {reason}\n"
    assert gpus_cmd.run(_args("--json"), nvml=fake.module) == 0
    assert json.loads(capsys.readouterr().out) == {
        "available": False,
        "status": f"no NVIDIA GPU: {reason}",
        "reason": reason,
        "driver": None,
        "gpus": [],
        "events": [],
        "simulated": False,
    }


def test_zero_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpus_cmd.run(_args(), nvml=FakeNvml([]).module) == 0
    assert capsys.readouterr().out == "no NVIDIA GPU: NVML sees no GPU\n"


def test_watch_json_until_interrupted(capsys: pytest.CaptureFixture[str]) -> None:
    fake = _machine()
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt

    assert (
        gpus_cmd.run(_args("--watch", "--json", "--interval", "0.5"), nvml=fake.module, sleep=sleep)
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(json.loads(line)["available"] for line in lines)
    assert naps == [0.5, 0.5, 0.5]
    assert fake.initialized == 0  # every reading closed NVML again


def test_watch_table(capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 2:
            raise KeyboardInterrupt

    assert gpus_cmd.run(_args("--watch"), nvml=_machine().module, sleep=sleep) == 0
    assert "61.0/80" in capsys.readouterr().out  # (a terminal would see it refreshed)


def test_the_real_nvml_here(capsys: pytest.CaptureFixture[str]) -> None:
    """No driver on this machine: a clear line and exit 0 (on a GPU machine, a table)."""
    assert gpus_cmd.run(_args()) == 0
    out = capsys.readouterr().out
    assert out.startswith("no NVIDIA GPU: ") or "GPU" in out
