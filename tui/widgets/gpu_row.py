"""One GPU on one line: utilisation and memory sparklines, temperature, power, health."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, Sparkline

from ftsup.tui.format import DASH, shorten
from ftsup.tui.model import as_float, as_int


def _gib(value: Any) -> str:
    number = as_float(value)
    if number is None:
        return DASH
    return f"{number / 2**30:.0f}"


class GpuRow(Horizontal):
    DEFAULT_CSS = """
    GpuRow { height: 1; }
    GpuRow Label { width: auto; padding: 0 1 0 0; }
    GpuRow .gpu-name { width: 14; }
    GpuRow Sparkline { width: 1fr; max-width: 24; height: 1; margin: 0 1 0 0; }
    GpuRow .gpu-util { width: 5; }
    GpuRow .gpu-mem { width: 8; }
    GpuRow .gpu-sensors { width: 16; }
    GpuRow.-unhealthy .gpu-name, GpuRow.-unhealthy .gpu-sensors {
        color: $error; text-style: bold;
    }
    """

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def compose(self) -> ComposeResult:
        yield Label("", classes="gpu-name")
        yield Sparkline([], classes="util-spark")
        yield Label("", classes="gpu-util")
        yield Sparkline([], classes="mem-spark")
        yield Label("", classes="gpu-mem")
        yield Label("", classes="gpu-sensors")

    def show(self, gpu: dict[str, Any], series: Mapping[str, Sequence[float]]) -> None:
        name = str(gpu.get("name") or "")
        name = name.removeprefix("NVIDIA ")
        shown = gpu.get("label", self.index)  # "n2:0" with several daemons (tui/multi.py)
        self.query_one(".gpu-name", Label).update(shorten(f"{shown} {name}", 13), layout=False)
        self.query_one(".util-spark", Sparkline).data = list(series.get("util", ()))
        self.query_one(".mem-spark", Sparkline).data = list(series.get("mem", ()))
        util = as_float(gpu.get("util"))
        self.query_one(".gpu-util", Label).update(
            f"{util:.0f}%" if util is not None else DASH, layout=False
        )
        mem = f"{_gib(gpu.get('mem_used'))}/{_gib(gpu.get('mem_total'))}G"
        self.query_one(".gpu-mem", Label).update(mem, layout=False)
        temp, power = as_int(gpu.get("temp")), as_float(gpu.get("power"))
        sensors = f"{temp}°C" if temp is not None else DASH
        sensors += f" {power:.0f}W" if power is not None else ""
        healthy = gpu.get("healthy", True) is not False
        reason = str(gpu.get("unhealthy_reason") or "unhealthy")
        # The full reason is in the tooltip and in the events (gpu_fault): the row
        # keeps its sparklines at 80 columns.
        self.query_one(".gpu-sensors", Label).update(
            sensors + ("" if healthy else " FAULT"), layout=False
        )
        self.tooltip = None if healthy else f"GPU {shown}: {reason}"
        self.set_class(not healthy, "-unhealthy")
