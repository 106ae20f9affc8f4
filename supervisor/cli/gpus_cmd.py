"""`ftsup gpus`: what NVML says about this machine's GPUs, without the daemon.

It is the first thing to run on a new machine (is the driver there? which
GPUs, how healthy?) and when a run failed on a GPU, so it reads NVML itself.
No driver or no GPU is an answer, not an error: "no NVIDIA GPU: <reason>", exit 0.

With FTSUP_SIMULATE_GPUS the GPUs are the daemon's simulated ones: it shows the
daemon's reading (with the XIDs `ftsup gpus simulate-xid` injected there), or,
without a daemon, a fresh set of the same simulated GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ftsup.supervisor.cli import common, output
from ftsup.supervisor.client import Client, DaemonUnavailable
from ftsup.supervisor.contract import ENV_SIMULATE_GPUS
from ftsup.supervisor.durations import parse_size
from ftsup.supervisor.health import simulated
from ftsup.supervisor.health.gpu import gpu_entry, gpu_reading
from ftsup.supervisor.health.gpu_metrics import GpuLost, read_info, read_sample
from ftsup.supervisor.health.nvml import (
    Nvml,
    NvmlUnavailable,
    describe_error,
    is_gpu_lost,
    nvml_session,
)
from ftsup.supervisor.paths import Layout
from ftsup.supervisor.protocol import RequestError, RequestType

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
    actions = parser.add_subparsers(dest="gpus_action", metavar="ACTION")
    xid = actions.add_parser(
        "simulate-xid",
        help="inject an XID on a simulated GPU (daemon started with FTSUP_SIMULATE_GPUS)",
        description=(
            "Inject XID on simulated GPU INDEX in the daemon: it takes the path of a real "
            "XID (health, events, the [gpu] xid_actions of the jobs on that GPU). "
            "Refused (exit 5) unless the daemon's GPUs are simulated."
        ),
    )
    xid.add_argument("index", type=int, metavar="INDEX", help="GPU index")
    xid.add_argument("xid", type=int, metavar="XID", help="XID number, e.g. 79 or 13")
    common.add_common(xid)
    xid.set_defaults(func=run_simulate_xid)
    held = actions.add_parser(
        "simulate-process",
        help="let a process hold memory on a simulated GPU (FTSUP_SIMULATE_GPUS)",
        description=(
            "Process PID holds SIZE (e.g. 4G) on simulated GPU INDEX until it exits, as "
            "another user's process or a dying run would: jobs wait before (re)launching "
            "there. SIZE 0 lets go. Refused (exit 5) unless the daemon's GPUs are simulated."
        ),
    )
    held.add_argument("index", type=int, metavar="INDEX", help="GPU index")
    held.add_argument("pid", type=int, metavar="PID", help="a live process on this machine")
    held.add_argument("size", metavar="SIZE", help='memory it holds: "4G", "512M" or bytes')
    common.add_common(held)
    held.set_defaults(func=run_simulate_process)
    reset = actions.add_parser(
        "reset",
        help="mark a GPU healthy again (after nvidia-smi -r or a reboot)",
        description=(
            "Tell the daemon that GPU INDEX was reset: jobs may be placed on it again, "
            "and jobs waiting for it start."
        ),
    )
    reset.add_argument("index", type=int, metavar="INDEX", help="GPU index")
    common.add_common(reset)
    reset.set_defaults(func=run_reset)


def run(
    args: argparse.Namespace,
    *,
    nvml: Nvml | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print one reading, or keep printing with --watch until interrupted."""
    try:
        read = _reader(nvml)
    except simulated.SimulationError as err:
        output.error(str(err))
        return output.EXIT_BAD_INPUT
    try:
        if not args.watch:
            _show(read(), as_json=args.json)
            return output.EXIT_OK
        if args.json:
            while True:
                sys.stdout.write(json.dumps(read(), sort_keys=True) + "\n")
                sys.stdout.flush()
                sleep(args.interval)
        with Live(gpus_table(read()), console=output.stdout, auto_refresh=False) as live:
            while True:
                sleep(args.interval)
                live.update(gpus_table(read()), refresh=True)
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


def _reader(nvml: Nvml | None) -> Callable[[], dict[str, Any]]:
    """What reads the GPUs: NVML, or the simulated GPUs FTSUP_SIMULATE_GPUS asks
    for (raises SimulationError when it cannot be read)."""
    if nvml is None:
        gpus = simulated.from_env(os.environ)
        if gpus is not None:
            return lambda: _simulated_reading(gpus)
    return lambda: read_gpus(nvml)


def _simulated_reading(gpus: simulated.SimulatedGpus) -> dict[str, Any]:
    """Simulated GPUs live in the daemon: its reading when it answers with
    simulated GPUs (their faults included); else a fresh, healthy set."""
    try:
        with Client(Layout.from_env().socket) as client:
            answer = client.request(RequestType.GPUS)
    except (DaemonUnavailable, RequestError):
        return read_gpus(gpus)
    return answer if answer.get("simulated") is True else read_gpus(gpus)


def run_simulate_xid(args: argparse.Namespace) -> int:
    """`ftsup gpus simulate-xid INDEX XID`: the daemon's answer is its GPU reading."""
    try:
        with common.connect(args) as client:
            reading = client.request(RequestType.GPU_SIMULATE_XID, index=args.index, xid=args.xid)
    except DaemonUnavailable as exc:
        return common.report_unavailable(args, exc)
    except RequestError as exc:
        code = common.report_request_error(args, exc)
        return output.EXIT_REFUSED if exc.code in ("not_simulated", "not_running") else code
    if args.json:
        output.print_json(reading)
        return output.EXIT_OK
    gpu: dict[str, Any] = next((g for g in reading["gpus"] if g.get("index") == args.index), {})
    health = "healthy" if gpu.get("healthy") else f"unhealthy ({gpu.get('unhealthy_reason')})"
    output.stdout.print(
        f"XID {args.xid} injected on simulated GPU {args.index}: now {health}", markup=False
    )
    output.stdout.print(gpus_table(reading))
    return output.EXIT_OK


def run_simulate_process(args: argparse.Namespace) -> int:
    """`ftsup gpus simulate-process INDEX PID SIZE`: the answer is the daemon's GPU reading."""
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        output.error(f"SIZE {args.size!r}: {exc} (write e.g. 4G, 512M or bytes)")
        return output.EXIT_BAD_INPUT
    try:
        with common.connect(args) as client:
            reading = client.request(
                RequestType.GPU_SIMULATE_PROCESS, index=args.index, pid=args.pid, bytes=size
            )
    except DaemonUnavailable as exc:
        return common.report_unavailable(args, exc)
    except RequestError as exc:
        code = common.report_request_error(args, exc)
        return output.EXIT_REFUSED if exc.code == "not_simulated" else code
    if args.json:
        output.print_json(reading)
        return output.EXIT_OK
    output.stdout.print(
        f"pid {args.pid} holds {args.size} on simulated GPU {args.index} until it exits",
        markup=False,
    )
    output.stdout.print(gpus_table(reading))
    return output.EXIT_OK


def run_reset(args: argparse.Namespace) -> int:
    """`ftsup gpus reset INDEX`: the daemon's `gpu_reset`; its answer is the GPU reading."""
    try:
        with common.connect(args) as client:
            reading = client.request(RequestType.GPU_RESET, index=args.index)
    except DaemonUnavailable as exc:
        return common.report_unavailable(args, exc)
    except RequestError as exc:
        return common.report_request_error(args, exc)
    if args.json:
        output.print_json(reading)
        return output.EXIT_OK
    output.stdout.print(f"GPU {args.index} marked healthy", markup=False)
    output.stdout.print(gpus_table(reading))
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
    return gpu_reading(
        available=True,
        status=status,
        reason=None,
        driver=driver,
        gpus=gpus,
        simulated=isinstance(n, simulated.SimulatedGpus),
    )


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
        title=_title(reading),
        title_justify="left",
        title_style="dim",
    )
    for column in _COLUMNS:
        table.add_column(column, no_wrap=column not in ("NAME", "THROTTLE"))
    for gpu in reading["gpus"]:
        table.add_row(*_row(gpu))
    return table


def _title(reading: dict[str, Any]) -> str:
    if reading.get("simulated"):
        return f"simulated GPUs ({ENV_SIMULATE_GPUS}), not real ones"
    return f"driver {reading['driver']}"


def _row(gpu: dict[str, Any]) -> list[str]:
    index = str(gpu["index"])
    s = gpu.get("latest")
    if not isinstance(s, dict):
        problem = escape(str(gpu.get("unhealthy_reason") or "unreadable"))
        return [index, f"[bold red]{problem}[/]", *["-"] * 9]
    name = escape(str(gpu.get("name", "-")).removeprefix("NVIDIA "))
    if gpu.get("healthy") is False:  # the daemon's mark (an XID), with a reading still
        name += f" [bold red]unhealthy: {escape(str(gpu.get('unhealthy_reason')))}[/]"
    return [
        index,
        name,
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
