"""Adds `FtsupCallback` to every transformers `Trainer` of an unmodified script.

Loaded by the bootstrap (`trainer/bootstrap/sitecustomize.py`) right after the
process imports `transformers.trainer`. It wraps two methods of the `Trainer`
class, so subclasses (TRL's `SFTTrainer`, LLaMA-Factory's trainers, Axolotl's)
are covered too:

- `__init__`: after the trainer is built, add an `FtsupCallback` (unless the
  script already added one): progress every step, SIGTERM/SIGUSR1 -> save at the
  next step boundary and stop, SIGUSR2 -> save now.
- `train`: when training ended on a stop request, exit 75 (`EXIT_STOPPED`)
  instead of running the rest of the script (a final `save_model` would write a
  half-trained model where the finished one belongs).

Whatever fails in here is reported and the trainer runs on uninstrumented.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ftsup.supervisor.contract import (
    ENV_RESUME_FROM,
    EXIT_STOPPED,
    PROGRESS_INSTRUMENT_FAILED,
    PROGRESS_INSTRUMENTED,
)
from ftsup.trainer import dist
from ftsup.trainer.progress import ProgressWriter

_WRAPPED = "__ftsup_instrumented__"


def instrument_trainer_module(module: ModuleType) -> None:
    """Wrap `module.Trainer` once (the bootstrap calls this when it is imported)."""
    trainer_class = module.Trainer
    if getattr(trainer_class, _WRAPPED, False):
        return
    trainer_class.__init__ = _wrap_init(trainer_class.__init__)
    trainer_class.train = _wrap_train(trainer_class.train)
    setattr(trainer_class, _WRAPPED, True)


def _wrap_init(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            _add_callback(self)
        except Exception as exc:  # the trainer was built: let it train, uninstrumented
            _report_failure(f"{type(exc).__name__}: {exc}")

    return __init__


def _wrap_train(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        callback = ftsup_callback_of(self)
        if callback is not None and callback.stopped:
            print(
                f"ftsup: stopped on request after saving step {self.state.global_step}; "
                f"exiting {EXIT_STOPPED} (resume continues from there)",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(EXIT_STOPPED)
        return result

    return train


def ftsup_callback_of(trainer: Any) -> Any:
    """The trainer's FtsupCallback (ours or one the script added by hand), or None."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "FtsupCallback":
            return callback
    return None


def _add_callback(trainer: Any) -> None:
    import transformers

    callback = ftsup_callback_of(trainer)
    added_by = "script"  # the script adds FtsupCallback itself: keep that one
    if callback is None:
        from ftsup.trainer.callback import FtsupCallback

        callback = FtsupCallback(resumed_from=os.environ.get(ENV_RESUME_FROM) or None)
        trainer.add_callback(callback)
        added_by = "ftsup"
    callback.report(
        PROGRESS_INSTRUMENTED,
        trainer=type(trainer).__name__,
        transformers=getattr(transformers, "__version__", None),
        added_by=added_by,
        pid=os.getpid(),  # `ftsup save` signals this process, not a launcher above it
    )


def _report_failure(what: str) -> None:
    """To the job's log and, from rank 0, to the daemon (status shows it)."""
    print(
        f"ftsup: instrumentation failed ({what}); training continues without it",
        file=sys.stderr,
        flush=True,
    )
    if dist.rank() == 0:
        writer = ProgressWriter.from_env()
        writer.emit(PROGRESS_INSTRUMENT_FAILED, error=what)
        writer.close()
