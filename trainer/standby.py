"""`python -m ftsup.trainer.standby --config RUN/train.json`: a trainer that waits, warm.

Started by `ftsup.supervisor.standby_shim` while the job's current attempt
trains. It imports torch, transformers and peft and tokenizes the data set,
reports `ready` with how long that took, and blocks until the shim hands it an
attempt: the trainer's arguments, its environment, and the output-folder lock
descriptor. Then it becomes that attempt (`run.main`), with the data it
already prepared when nothing it depends on changed meanwhile.

Waiting costs no GPU memory: CUDA is never initialised before activation
(`PYTORCH_NVML_BASED_CUDA_CHECK` keeps even the availability check off the
driver), and the base model is not loaded, because for QLoRA loading means
quantising on the GPU, and for big models a second host copy is not cheap.
The result of a taken-over run is identical to a cold restart's: activation
runs the same `run.main` from the same checkpoint, with the same environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftsup.supervisor.contract import ENV_ATTEMPT, ENV_STANDBY_FD
from ftsup.supervisor.standby_shim import MAX_MESSAGE
from ftsup.trainer.prepared import PreparedData


def warm_imports() -> None:
    """Everything a run imports before its first step, imported now."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import (  # noqa: F401
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    import ftsup.trainer.async_save
    import ftsup.trainer.callback
    import ftsup.trainer.checkpointing
    import ftsup.trainer.model
    import ftsup.trainer.skipping  # noqa: F401


def warm_data(config_path: str) -> PreparedData | None:
    """The tokenized data set, or None when it cannot be built now: the activated
    run then builds it itself and reports any problem exactly as a cold start
    would, so no failure here may end the standby."""
    from ftsup.trainer.config import load_run_config
    from ftsup.trainer.prepared import prepare_data

    try:
        return prepare_data(load_run_config(Path(config_path), check_files=False).train)
    except Exception:
        return None


def wait_for_attempt(control: socket.socket) -> dict[str, Any] | None:
    """The activation message (args, env; the lock descriptor is kept open), or None
    when the shim closed the socket: the standby was discarded."""
    try:
        message, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE, 4)
    except OSError:
        return None
    if not message:
        return None
    activation: dict[str, Any] = json.loads(message)
    activation["lock_fds"] = fds  # held until this process exits, like a cold trainer's
    return activation


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftsup.trainer.standby")
    parser.add_argument("--config", required=True, help="train.json written by ftsup")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    control = socket.socket(fileno=int(os.environ.pop(ENV_STANDBY_FD)))
    began = time.monotonic()
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    warm_imports()
    prepared = warm_data(args.config)
    import torch

    ready = {
        "ready_s": round(time.monotonic() - began, 3),
        "data_prepared": prepared is not None,
        "cuda_initialized": bool(torch.cuda.is_initialized()),  # type: ignore[no-untyped-call]
    }
    print(f"ftsup standby: warm in {ready['ready_s']:.2f} s; waiting", flush=True)
    # Activated while warming: the shim has sent the attempt and closed its end.
    with contextlib.suppress(OSError):
        control.send(json.dumps(ready).encode())
    activation = wait_for_attempt(control)
    control.close()
    if activation is None:
        return 0
    os.environ.clear()
    os.environ.update(activation["env"])
    print(f"ftsup standby: taking over as attempt {os.environ.get(ENV_ATTEMPT)}", flush=True)
    from ftsup.trainer import run

    return run.main(activation["args"], prepared=prepared)


if __name__ == "__main__":
    sys.exit(main())
