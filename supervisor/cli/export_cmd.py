"""`ftsup export JOB|CHECKPOINT --out DIR`: a standalone model from a checkpoint.

A job name means the job's newest valid checkpoint (asked of the daemon, which
knows the output folder and the base model); a folder means that checkpoint.
The work is the built-in trainer's (`ftsup.trainer.export`), so it needs the
`train` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ftsup.supervisor.checkpoints import discovery
from ftsup.supervisor.cli import output
from ftsup.supervisor.cli.common import add_common, ask
from ftsup.supervisor.spec import SpecError, parse_spec


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="write a standalone model from a job's newest checkpoint or from a checkpoint folder",
    )
    p.add_argument("source", help="a job name, or a checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    p.add_argument(
        "--no-merge",
        dest="merge",
        action="store_false",
        help="keep a LoRA adapter separate (default: merge it into the base)",
    )
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    p.add_argument(
        "--base-model",
        default=None,
        help="the base model (default: the job's, or the adapter's record)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    add_common(p)
    p.set_defaults(func=cmd_export)


def _from_job(args: argparse.Namespace) -> tuple[Path, str | None] | int:
    job = ask(args, lambda client: client.request("status", job=args.source))
    if isinstance(job, int):
        return job
    choice = discovery.select_resume(Path(job["output_dir"]), quarantine=False)
    if choice.path is None:
        output.error(f"job {args.source!r} has no valid checkpoint in {job['output_dir']}")
        return output.EXIT_NOT_FOUND
    base = None
    try:
        spec = parse_spec(Path(job["spec_path"]).read_text(), Path(job["spec_path"]))
        base = spec.train.model if spec.train else None
    except (OSError, SpecError):
        pass  # the adapter's own record of its base is the fallback
    return choice.path, base


def cmd_export(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if source.is_dir():
        checkpoint, base = source, None
    else:
        found = _from_job(args)
        if isinstance(found, int):
            return found
        checkpoint, base = found
    output.libraries_log_to_stderr()  # --json: nothing but the answer on stdout
    try:
        from ftsup.trainer.export import ExportError, export_model
    except ImportError as exc:
        output.error(
            f"export needs the built-in trainer's packages ({exc.name} is missing)",
            hint="pip install 'ftsup[train]'",
        )
        return output.EXIT_FAILED
    try:
        written = export_model(
            checkpoint,
            args.base_model or base,
            args.out,
            merge=args.merge,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (ExportError, FileExistsError) as exc:
        output.error(str(exc))
        return output.EXIT_BAD_INPUT
    if args.json:
        output.print_json(
            {"checkpoint": str(checkpoint), "out": str(written), "merged": args.merge}
        )
    else:
        output.stdout.print(
            f"exported {checkpoint} to {written}" + (" (LoRA merged)" if args.merge else ""),
            markup=False,
        )
    return output.EXIT_OK
