"""Access to NVML (nvidia-ml-py's `pynvml`) that turns "no GPU here" into a reason.

Every health function that talks to NVML takes the module as a parameter
(default: the real `pynvml`), so that tests can pass a double that behaves like
it. A machine without the driver, the library or a GPU is a normal case: it
yields `NvmlUnavailable(reason)`, never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

Nvml = Any  # the pynvml module or a stand-in with the same names


class NvmlUnavailable(Exception):
    """NVML cannot be used here; str() is the reason, for "GPU monitor off: <reason>"."""


def load_nvml(module: Nvml | None = None) -> Nvml:
    if module is not None:
        return module
    try:
        return importlib.import_module("pynvml")
    except ImportError as err:
        raise NvmlUnavailable("nvidia-ml-py (pynvml) is not installed") from err


def error_code(err: BaseException) -> int | None:
    value = getattr(err, "value", None)
    return value if isinstance(value, int) else None


def is_not_supported(nvml: Nvml, err: BaseException) -> bool:
    """Not supported by this GPU, or by this driver (an older one lacks the function)."""
    return error_code(err) in (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_FUNCTION_NOT_FOUND)


def is_gpu_lost(nvml: Nvml, err: BaseException) -> bool:
    return error_code(err) == int(nvml.NVML_ERROR_GPU_IS_LOST)


def describe_error(err: BaseException) -> str:
    try:
        return str(err) or type(err).__name__
    except Exception:  # pynvml's __str__ calls into the library for unknown codes
        return f"NVML error {error_code(err)}"


def init_failure_reason(nvml: Nvml, err: BaseException) -> str:
    code = error_code(err)
    if code == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return "NVML library not found (is the NVIDIA driver installed?)"
    if code == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return "NVIDIA driver not loaded"
    if code == nvml.NVML_ERROR_NO_PERMISSION:
        return "no permission to use NVML"
    if code == nvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return "NVML library and driver versions differ (reboot or reload the driver)"
    return f"NVML init failed: {describe_error(err)}"


def init(nvml: Nvml) -> None:
    """nvmlInit, with every failure mapped to NvmlUnavailable."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:
        raise NvmlUnavailable(init_failure_reason(nvml, err)) from err
    except OSError as err:  # a library that exists but cannot be loaded
        raise NvmlUnavailable(f"NVML library cannot be loaded: {err}") from err


def shutdown(nvml: Nvml) -> None:
    with contextlib.suppress(Exception):  # nothing useful to do about a failing shutdown
        nvml.nvmlShutdown()


@contextmanager
def nvml_session(module: Nvml | None = None) -> Iterator[Nvml]:
    """nvmlInit .. nvmlShutdown (NVML counts them, so sessions may nest)."""
    nvml = load_nvml(module)
    init(nvml)
    try:
        yield nvml
    finally:
        shutdown(nvml)


def device_count(nvml: Nvml) -> int:
    try:
        return int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as err:
        raise NvmlUnavailable(f"cannot count GPUs: {describe_error(err)}") from err
