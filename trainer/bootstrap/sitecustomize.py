"""ftsup's zero-change instrumentation of `[command]` jobs (the daemon puts this
folder first on the command's PYTHONPATH; `[command] instrument = false` leaves it off).

Python imports `sitecustomize` at start-up. This one does three cheap things and
imports no module the interpreter has not already loaded:

1. takes its own folder off `sys.path` (the user's imports resolve as before),
2. runs the `sitecustomize` this one shadows, if there is one,
3. watches for two imports, and only when the process makes one does it load
   ftsup's trainer-side code (`ftsup.trainer.instrument`):
   `transformers.trainer` (add `FtsupCallback` to every `Trainer` the process
   creates) and `torch.distributed.launcher.api` (torchrun's agent, also under
   `accelerate launch`: pass stop and save signals on to the workers, keep
   exit 75).

A process that never imports transformers runs exactly as without it. Any failure
while instrumenting is reported (stderr and the progress file) and the trainer
runs on uninstrumented. Written for any Python 3 the user's venv may have: the
instrumentation itself needs 3.10+, and says so instead of failing the trainer.
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType  # `types`, `os`, `sys`, `time`: loaded before site runs

TYPE_CHECKING = False  # not `typing`'s: that module is not loaded at start-up
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec

_HERE = os.path.dirname(os.path.abspath(__file__))
# .../ftsup/trainer/bootstrap: the folder that holds ftsup's `trainer` and `supervisor`.
_FTSUP_ROOT = os.path.dirname(os.path.dirname(_HERE))
# The modules watched, and the function of `ftsup.trainer.instrument` each is given to.
_TARGETS = {
    "transformers.trainer": "instrument_trainer_module",
    "torch.distributed.launcher.api": "instrument_launcher_module",
}


def _same_dir(entry: str) -> bool:
    try:
        return os.path.abspath(entry or os.curdir) == _HERE
    except (TypeError, ValueError, OSError):
        return False


def _report_failure(what: str) -> None:
    """Tell the user (job log) and the daemon (progress file, rank 0 only)."""
    message = f"ftsup: instrumentation failed ({what}); training continues without it"
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except Exception:  # a closed stderr must not break the trainer either
        pass
    path = os.environ.get("FTSUP_PROGRESS_FILE")
    if not path or os.environ.get("RANK", "0") != "0":
        return
    import json

    line = json.dumps({"ts": round(time.time(), 3), "event": "instrument_failed", "error": what})
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def _ensure_ftsup_importable() -> None:
    """The trainer's venv need not have ftsup installed: name this copy's folder as the
    `ftsup` namespace (unless the process already imported an `ftsup`)."""
    if "ftsup" in sys.modules:
        return
    package = ModuleType("ftsup")
    package.__path__ = [_FTSUP_ROOT]
    sys.modules["ftsup"] = package


def _attach(module: ModuleType) -> None:
    if sys.version_info < (3, 10):  # noqa: UP036 (this runs under the trainer's Python)
        found = ".".join(str(part) for part in sys.version_info[:2])
        _report_failure(f"ftsup needs Python 3.10 or newer in the trainer, found {found}")
        return
    try:
        _ensure_ftsup_importable()
        from ftsup.trainer import instrument

        getattr(instrument, _TARGETS[module.__name__])(module)
    except Exception as exc:  # never break the trainer
        _report_failure(f"{type(exc).__name__}: {exc}")


class _AttachingLoader:
    """Runs the real loader, then instruments the module it made."""

    def __init__(self, inner: Loader) -> None:
        self._inner = inner

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self._inner, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _attach(module)

    def __getattr__(self, name: str) -> object:  # get_source, get_resource_reader, ...
        return getattr(self._inner, name)


class _TrainerImportWatcher:
    """A meta-path finder that answers only for the watched modules, by asking the
    finders after it and wrapping the loader they return."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec: ModuleSpec | None = find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _AttachingLoader(spec.loader)  # type: ignore[assignment]
            return spec
        return None

    def invalidate_caches(self) -> None:
        pass


def _run_shadowed_sitecustomize() -> None:
    """The user's own sitecustomize (a venv's, a distro's) still runs, under its name."""
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    spec = PathFinder.find_spec("sitecustomize", sys.path)
    if spec is None or spec.loader is None:
        return
    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _install() -> None:
    sys.path[:] = [entry for entry in sys.path if not _same_dir(entry)]
    if not any(isinstance(f, _TrainerImportWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrainerImportWatcher())
    _run_shadowed_sitecustomize()


_install()
