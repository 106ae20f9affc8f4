"""`ftsup gpus`: what NVML says about this machine's GPUs, without the daemon.

It is the first thing to run on a new machine (is the driver there? which
GPUs, how healthy?) and when a run failed on a GPU, so it reads NVML itself.
No driver or no GPU is an answer, not an error: "no NVIDIA GPU: <reason>", exit 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ftsup.supervisor.cli import output
from ftsup.supervisor.health.gpu import gpu_entry, gpu_reading
from ftsup.supervisor.health.gpu_metrics import GpuLost, read_info, read_sample
from ftsup.supervisor.health.nvml import (
    Nvml,
    NvmlUnavailable,
    describe_error,
    is_gpu_lost,
    nvml_session,
)

_COLUMNS = (
    "GPU",
    "NAME",
    "UTIL",
    "MEM GiB",
    "TEMP",
    "POWER W",
    "SM MHz",
    "THROTTLE",
    "ECC v/a",  # uncorrected errors, volatile/aggregate
    "REMAP",
    "REPLAY",
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ftsup gpus`."""
    parser = subparsers.add_parser(
        "gpus",
        help="show the GPUs: utilisation, memory, temperature, power, throttling, errors",
        description="Read the GPUs through NVML (no daemon needed). Exit 0 even without a GPU.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON (one line per reading with --watch)"
    )
    parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    parser.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="refresh period (--watch)"
    )
    parser.set_defaults(func=run)


def run(
    args: argparse.Namespace,
    *,
    nvml: Nvml | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print one reading, or keep printing with --watch until interrupted."""
    try:
        if not args.watch:
            _show(read_gpus(nvml), as_json=args.json)
            return output.EXIT_OK
        if args.json:
            while True:
                sys.stdout.write(json.dumps(read_gpus(nvml), sort_keys=True) + "\n")
                sys.stdout.flush()
                sleep(args.interval)
        with Live(gpus_table(read_gpus(nvml)), console=output.stdout, auto_refresh=False) as live:
            while True:
                sleep(args.interval)
                live.update(gpus_table(read_gpus(nvml)), refresh=True)
    except NvmlUnavailable as err:
        if args.json:
            output.print_json(
                gpu_reading(
                    available=False,
                    status=f"no NVIDIA GPU: {err}",
                    reason=str(err),
                    driver=None,
                    gpus=[],
                )
            )
        else:
            output.stdout.print(f"no NVIDIA GPU: {err}", markup=False)
        return output.EXIT_OK
    except KeyboardInterrupt:
        return output.EXIT_OK


def read_gpus(nvml: Nvml | None = None) -> dict[str, Any]:
    """One reading of every GPU in the shape of the daemon's `gpus` answer
    (`gpu_reading`, docs/health.md); raises NvmlUnavailable."""
    with nvml_session(nvml) as n:
        count = int(n.nvmlDeviceGetCount())
        if count == 0:
            raise NvmlUnavailable("NVML sees no GPU")
        driver = n.nvmlSystemGetDriverVersion()
        gpus = [_read_one(n, index) for index in range(count)]
    driver = driver.decode() if isinstance(driver, bytes) else str(driver)
    status = f"{count} GPU{'s' if count != 1 else ''}, driver {driver}"
    return gpu_reading(available=True, status=status, reason=None, driver=driver, gpus=gpus)


def _read_one(n: Nvml, index: int) -> dict[str, Any]:
    """As the daemon's monitor reads it: a GPU that cannot be read is unhealthy."""
    info: dict[str, Any] = {"index": index}
    try:
        handle = n.nvmlDeviceGetHandleByIndex(index)
    except n.NVMLError as err:
        reason = "GPU is lost" if is_gpu_lost(n, err) else f"no NVML handle: {describe_error(err)}"
        return gpu_entry(info, [], reason)
    try:
        info = read_info(n, handle, index)
        return gpu_entry(info, [read_sample(n, handle, time.time())], None)
    except GpuLost:
        return gpu_entry(info, [], "GPU is lost")


def _show(reading: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        output.print_json(reading)
    else:
        output.stdout.print(gpus_table(reading))


def gpus_table(reading: dict[str, Any]) -> Table:
    table = Table(
        box=None,
        header_style="bold",
        pad_edge=False,
        title=f"driver {reading['driver']}",
        title_justify="left",
        title_style="dim",
    )
    for column in _COLUMNS:
        table.add_column(column, no_wrap=column not in ("NAME", "THROTTLE"))
    for gpu in reading["gpus"]:
        table.add_row(*_row(gpu))
    return table


def _row(gpu: dict[str, Any]) -> list[str]:
    index = str(gpu["index"])
    s = gpu.get("latest")
    if not isinstance(s, dict):
        problem = escape(str(gpu.get("unhealthy_reason") or "unreadable"))
        return [index, f"[bold red]{problem}[/]", *["-"] * 9]
    return [
        index,
        escape(str(gpu.get("name", "-")).removeprefix("NVIDIA ")),
        _pct(s.get("util_gpu")),
        _memory(s.get("mem_used"), s.get("mem_total")),
        f"{s['temp_c']}°C" if "temp_c" in s else "-",
        _power(s.get("power_w"), s.get("power_limit_w")),
        str(s.get("sm_clock_mhz", "-")),
        _throttle(s.get("clock_events")),
        _ecc(s.get("ecc_volatile_uncorrected"), s.get("ecc_aggregate_uncorrected")),
        _remap(s),
        str(s.get("pcie_replay", "-")),
    ]


def _pct(value: int | None) -> str:
    return "-" if value is None else f"{value}%"


def _memory(used: int | None, total: int | None) -> str:
    if used is None or total is None:
        return "-"
    return f"{used / 2**30:.1f}/{total / 2**30:.0f}"


def _power(watts: float | None, limit: float | None) -> str:
    if watts is None:
        return "-"
    return f"{watts:.0f}" + (f"/{limit:.0f}" if limit is not None else "")


def _throttle(events: list[str] | None) -> str:
    if events is None:
        return "-"
    shown = [event for event in events if event != "gpu_idle"]
    bad = {"hw_slowdown", "hw_thermal_slowdown", "sw_thermal_slowdown", "hw_power_brake"}
    return ", ".join(f"[yellow]{e}[/]" if e in bad else e for e in shown) or "none"


def _ecc(volatile: int | None, aggregate: int | None) -> str:
    if volatile is None and aggregate is None:
        return "-"
    text = (
        f"{volatile if volatile is not None else '-'}/{aggregate if aggregate is not None else '-'}"
    )
    return f"[bold red]{text}[/]" if volatile else text


def _remap(sample: dict[str, Any]) -> str:
    if sample.get("remap_failure"):
        return "[bold red]failed[/]"
    if sample.get("remap_pending") or sample.get("retired_pages_pending"):
        return "[yellow]pending[/]"
    if "remap_pending" in sample or "retired_pages_pending" in sample:
        return "ok"
    return "-"
