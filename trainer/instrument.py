"""Adds `FtsupCallback` to every transformers `Trainer` of an unmodified script.

Loaded by the bootstrap (`trainer/bootstrap/sitecustomize.py`) right after the
process imports `transformers.trainer`. It wraps two methods of the `Trainer`
class, so subclasses (TRL's `SFTTrainer`, LLaMA-Factory's trainers, Axolotl's)
are covered too:

- `__init__`: after the trainer is built, add an `FtsupCallback` (unless the
  script already added one): progress every step, SIGTERM/SIGUSR1 -> save at the
  next step boundary and stop, SIGUSR2 -> save now.
- `train`: on a multi-node run, every rank resumes the checkpoint global rank 0
  chose (`nodes.agree_on_resume`, as the built-in trainer does) instead of the one
  its own node's daemon suggested; when training ended on a stop request, exit 75
  (`EXIT_STOPPED`) instead of running the rest of the script (a final
  `save_model` would write a half-trained model where the finished one belongs);
  a run resumed at `max_steps` (restarted after its last save: a worker that
  aborted at exit, a crash in the script's final export) trains nothing, where HF
  would train one step more, and the rest of the script runs on the checkpoint's
  weights.

And one function of torchrun's agent (`torch.distributed.launcher.api`, which
`torchrun`, `python -m torch.distributed.run` and `accelerate launch` all call),
so that a command launched through it keeps the contract as the built-in
trainer's `distrun` does: SIGTERM/SIGUSR1/SIGUSR2 are passed on to the workers
(torchrun would SIGKILL them 30 s after a SIGTERM, and die of SIGUSR1/SIGUSR2),
and a stop ends with 75 rather than torchrun's 1 for any worker exit. Its
workers ask to die with it (they run in sessions of their own). A launcher that
joins a multi-node rendezvous tells the daemon it waits for the other nodes.

Whatever fails in here is reported and the trainer runs on uninstrumented.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ftsup.supervisor.contract import (
    ENV_OUTPUT_DIR,
    ENV_RESUME_FROM,
    EXIT_STOPPED,
    PROGRESS_INSTRUMENT_FAILED,
    PROGRESS_INSTRUMENTED,
    PROGRESS_RENDEZVOUS,
    checkpoint_step,
)
from ftsup.trainer import dist, nodes
from ftsup.trainer.checkpointing import retire_checkpoints_after
from ftsup.trainer.progress import ProgressWriter

_WRAPPED = "__ftsup_instrumented__"
ENV_TORCHELASTIC_RUN_ID = "TORCHELASTIC_RUN_ID"  # set by torchrun's agent for its workers
AGREE_TIMEOUT_S = 600.0  # how long a rank waits for rank 0's choice of checkpoint


def instrument_trainer_module(module: ModuleType) -> None:
    """Wrap `module.Trainer` once (the bootstrap calls this when it is imported)."""
    trainer_class = module.Trainer
    if getattr(trainer_class, _WRAPPED, False):
        return
    if ENV_TORCHELASTIC_RUN_ID in os.environ:  # a torchrun worker, in a session of its own
        dist.die_with_parent()
    trainer_class.__init__ = _wrap_init(trainer_class.__init__)
    trainer_class.train = _wrap_train(trainer_class.train)
    setattr(trainer_class, _WRAPPED, True)


def instrument_launcher_module(module: ModuleType) -> None:
    """Wrap torchrun's `launch_agent` once (the bootstrap calls this on import)."""
    original = module.launch_agent
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def launch_agent(*args: Any, **kwargs: Any) -> Any:
        try:
            config = args[0] if args else kwargs.get("config")
            _keep_signals_for_workers(config)
            _announce_rendezvous(config)
        except Exception as exc:  # torchrun runs on as it would without ftsup
            _report_failure(f"torchrun's agent: {type(exc).__name__}: {exc}")
            return original(*args, **kwargs)
        try:
            return original(*args, **kwargs)
        except Exception as exc:
            try:
                code = _stop_exit_code(exc)
            except Exception:  # judging it must not hide torchrun's own error
                code = None
            if code == EXIT_STOPPED:
                raise SystemExit(code) from None
            raise

    setattr(launch_agent, _WRAPPED, True)
    setattr(module, "launch_agent", launch_agent)  # noqa: B010 (a module, typed as ModuleType)


def _keep_signals_for_workers(config: Any) -> None:
    """SIGTERM/SIGUSR1/SIGUSR2 go on to the workers; torchrun keeps only the others."""
    from ftsup.trainer.distrun import FORWARDED, TORCHRUN_SIGNALS, forward

    if not hasattr(config, "signals_to_handle"):  # torch < 2.6: torchrun handles SIGTERM
        return
    config.signals_to_handle = TORCHRUN_SIGNALS
    for sig in FORWARDED:
        signal.signal(sig, forward)


def _announce_rendezvous(config: Any) -> None:
    """A multi-node launcher waits for the other nodes from here on: the daemon
    shows `waiting for nodes` instead of judging a hang (as distrun does)."""
    if int(getattr(config, "max_nodes", 1)) <= 1 or config.rdzv_backend == "static":
        return
    writer = ProgressWriter.from_env()
    writer.emit(
        PROGRESS_RENDEZVOUS,
        state="waiting",
        nnodes=f"{config.min_nodes}:{config.max_nodes}"
        if config.min_nodes != config.max_nodes
        else str(config.max_nodes),
        endpoint=str(config.rdzv_endpoint),
        rdzv_id=str(config.run_id),
    )
    writer.close()


def _stop_exit_code(exc: Exception) -> int | None:
    """75 when the workers ended on a stop request (torchrun would say 1), else None."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from ftsup.trainer.distrun import FORWARDED_STOP, exit_code_for

    if not isinstance(exc, ChildFailedError):
        return None
    first_rank, first = exc.get_first_failure()
    others = [f.exitcode for rank, f in exc.failures.items() if rank != first_rank]
    return exit_code_for(first.exitcode, others, stop_forwarded=FORWARDED_STOP.stop)


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
        # Not at module level: torchrun's agent loads this module without transformers.
        from ftsup.trainer.callback import TrainingComplete

        if nodes.multi_node():
            args, kwargs = _agreed_resume(self, args, kwargs)
        try:
            result = original(self, *args, **kwargs)
        except TrainingComplete:
            return _complete_output(self)
        callback = ftsup_callback_of(self)
        if callback is not None and callback.stopped:
            print(
                f"ftsup: stopped on request after saving step {self.state.global_step}; "
                f"exiting {EXIT_STOPPED} (resume continues from there)",
                file=sys.stderr,
                flush=True,
            )
            dist.end_rank(EXIT_STOPPED, wait_for_threads=False)  # a rank of torchrun's ends here
            raise SystemExit(EXIT_STOPPED)
        return result

    return train


def _complete_output(trainer: Any) -> Any:
    """What `train` returns for a run resumed at `max_steps`: HF's TrainOutput of a
    call that trained no step (its speed metrics, total FLOs, a loss of 0)."""
    from transformers.trainer_utils import TrainOutput, speed_metrics

    trainer.is_in_train = False
    step = trainer.state.global_step
    if dist.rank() == 0:
        print(
            f"ftsup: resumed at max_steps ({step}): training is complete; the rest of "
            "the script runs on the checkpoint's weights",
            file=sys.stderr,
            flush=True,
        )
    metrics = speed_metrics("train", time.time(), num_samples=0, num_steps=0)  # type: ignore[no-untyped-call]
    metrics["total_flos"] = trainer.state.total_flos
    metrics["train_loss"] = 0.0
    return TrainOutput(step, 0.0, metrics)


def _agreed_resume(
    trainer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`train`'s arguments with rank 0's resume point, when the script resumes what
    the daemon suggested (its `resume_args`, or HF's `True` for "the newest").

    A failure here is raised, never skipped: nodes that resume different steps
    would train on, silently inconsistent."""
    positional = bool(args)
    given = args[0] if positional else kwargs.get("resume_from_checkpoint")
    suggested = os.environ.get(ENV_RESUME_FROM) or None
    follows_daemon = given is True or _same_path(given, suggested)
    if not follows_daemon:
        print(
            f"ftsup: the script resumes {given!r}, not the daemon's suggestion "
            f"({suggested or 'the start'}); the nodes' agreement is left out",
            file=sys.stderr,
            flush=True,
        )
        return args, kwargs
    output_dir = Path(os.environ.get(ENV_OUTPUT_DIR) or str(trainer.args.output_dir))
    node_local = bool(getattr(trainer.args, "save_on_each_node", False))
    choice = nodes.agree_on_resume(
        Path(suggested) if suggested else None,
        output_dir,
        AGREE_TIMEOUT_S,
        require_manifest=None,  # judged as the daemon judges a [command] job's folder
        node_local=node_local,
    )
    if node_local and dist.local_rank() == 0:
        # Newer copies that not every node held: those steps are written again,
        # and HF would write them into the leftover folders of the same name.
        step = checkpoint_step(choice) if choice is not None else 0
        retire_checkpoints_after(output_dir, step or 0)
    value = str(choice) if choice is not None else None
    callback = ftsup_callback_of(trainer)
    if callback is not None:  # its train_start names the checkpoint actually resumed
        callback.resumed_from = value
    if positional:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "resume_from_checkpoint": value}


def _same_path(given: Any, suggested: str | None) -> bool:
    if given is None or given is False:
        return suggested is None
    if suggested is None or not isinstance(given, str | os.PathLike):
        return False
    return os.path.abspath(os.fspath(given)) == os.path.abspath(suggested)


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
    callback.end_at_max_steps = True  # `train` (wrapped) catches TrainingComplete
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
