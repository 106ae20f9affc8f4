"""Completeness rules for DeepSpeed checkpoints (alone or inside an HF folder).

`engine.save_checkpoint(dir, tag)` writes `dir/<tag>/` with one model-states
file per model-parallel rank and, under ZeRO, one optimizer-states file per
data-parallel rank, then writes `dir/latest` naming the tag. So `latest` is
the marker, and every rank's file must be in the folder it names. ZeRO stage 0
keeps the optimizer inside the model states: no optimizer files is fine.

Checked against real DeepSpeed 0.19 output (tests/trainer/test_deepspeed.py
damages checkpoints the built-in trainer wrote): ZeRO-3 writes the model states per data-parallel
rank too (`zero_pp_rank_<dp>_mp_rank_<mp>_model_states.pt`), so both kinds
must cover the same ranks. Rank 0 writes `latest` without waiting for the
other ranks, so `latest` proves nothing about them: a rank missing from both
kinds is only visible with the world size (a manifest's, or the job's). Inside
HF's `checkpoint-N`, the tag must be `global_stepN`: a `latest` naming another
step describes a different save than the folder's trainer state.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..contract import checkpoint_step
from ..userfiles import NotRegularFile, read_bytes
from .files import check_file
from .findings import Findings

LATEST = "latest"
_MODEL_STATES = re.compile(r"^(?:(?:\w+_)?zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_TAG_STEP = re.compile(r"^global_step(\d+)$")
_OPTIM_STATES = re.compile(r"^((?:\w+_)?zero_pp_rank_)(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def is_deepspeed(folder: Path) -> bool:
    if (folder / LATEST).is_file():
        return True
    return any(p.name.startswith("global_step") and p.is_dir() for p in folder.iterdir())


def check_deepspeed(
    folder: Path, found: Findings, *, world_size: int | None, deep: bool = False
) -> None:
    """Fill `found`; sets `details["world_size"]` from the optimizer files when
    they say more than the caller knew."""
    tag = _read_latest(folder, found)
    if tag is None:
        return
    tag_dir = folder / tag
    if not tag_dir.is_dir():
        found.problem(f"{LATEST} names {tag}, which is missing")
        return
    found.details["deepspeed_tag"] = tag
    _check_tag_step(folder, tag, found)
    names = {p.name for p in tag_dir.iterdir()}
    mp_ranks = _check_model_states(tag, names, found)
    if mp_ranks:
        dp_ranks = _check_optim_states(tag, names, mp_ranks, found, world_size)
        _check_per_rank_model_states(tag, names, mp_ranks, dp_ranks, found)
    for path in sorted(tag_dir.iterdir()):
        if not path.is_dir() and (problem := check_file(path, deep=deep)):
            found.problem(f"{tag}/{path.name} {problem}")


def _read_latest(folder: Path, found: Findings) -> str | None:
    try:
        tag = read_bytes(folder / LATEST, limit=4096, follow=True).decode().strip()
    except FileNotFoundError:
        found.problem(f"{LATEST} missing (DeepSpeed writes it last: the save did not finish)")
        return None
    except NotRegularFile as exc:
        found.problem(f"{LATEST} is {exc.what}, not a regular file")
        return None
    except UnicodeDecodeError as exc:
        found.problem(f"{LATEST} unreadable: {exc}")
        return None
    if not tag:
        found.problem(f"{LATEST} is empty")
        return None
    if "/" in tag or tag in (".", ".."):
        found.problem(f"{LATEST} names {tag!r}, not a folder of this checkpoint")
        return None
    return tag


def _check_tag_step(folder: Path, tag: str, found: Findings) -> None:
    """HF's `checkpoint-N` holds the DeepSpeed save of step N (`global_stepN`)."""
    step = checkpoint_step(folder)
    match = _TAG_STEP.match(tag)
    if step is not None and match is not None and int(match.group(1)) != step:
        found.problem(
            f"{LATEST} names {tag}, but this is step {step}'s checkpoint "
            f"(expected global_step{step})"
        )


def _check_model_states(tag: str, names: set[str], found: Findings) -> int:
    """Model-parallel ranks found (0 when none): they must be 0..n-1."""
    mp = {int(m.group(2)) for n in names if (m := _MODEL_STATES.match(n))}
    if not mp:
        found.problem(f"{tag} has no model states (mp_rank_*_model_states.pt)")
        return 0
    for rank in range(max(mp) + 1):
        if rank not in mp:
            found.problem(f"{tag}/mp_rank_{rank:02d}_model_states.pt missing")
    return max(mp) + 1


def _check_optim_states(
    tag: str, names: set[str], mp_ranks: int, found: Findings, world_size: int | None
) -> int:
    """Data-parallel ranks the optimizer files must cover (0: no ZeRO files)."""
    files = [m for n in names if (m := _OPTIM_STATES.match(n))]
    if not files:
        found.note("no ZeRO optimizer files: optimizer state inside the model states")
        return 0
    prefix = files[0].group(1)
    have = {(int(m.group(2)), int(m.group(3))) for m in files}
    dp_ranks = max(dp for dp, _ in have) + 1
    # ZeRO-3's per-rank model states name data-parallel ranks too.
    per_rank_models = [
        int(m.group(1)) for n in names if (m := _MODEL_STATES.match(n)) and m.group(1)
    ]
    if per_rank_models:
        dp_ranks = max(dp_ranks, max(per_rank_models) + 1)
    if world_size and world_size % mp_ranks == 0:
        dp_ranks = max(dp_ranks, world_size // mp_ranks)
    for mp in range(mp_ranks):
        for dp in range(dp_ranks):
            if (dp, mp) not in have:
                found.problem(
                    f"{tag}/{prefix}{dp}_mp_rank_{mp:02d}_optim_states.pt missing "
                    f"(rank {dp} of {dp_ranks})"
                )
    found.details["world_size"] = dp_ranks * mp_ranks
    return dp_ranks


def _check_per_rank_model_states(
    tag: str, names: set[str], mp_ranks: int, dp_ranks: int, found: Findings
) -> None:
    """ZeRO-3 (model states per data-parallel rank): every rank's file, like the optimizer's."""
    matches = [m for n in names if (m := _MODEL_STATES.match(n)) and m.group(1) is not None]
    if not matches or not dp_ranks:
        return
    prefix = matches[0].group(0).split("zero_pp_rank_")[0]
    have = {(int(m.group(1)), int(m.group(2))) for m in matches}
    for mp in range(mp_ranks):
        for dp in range(dp_ranks):
            if (dp, mp) not in have:
                found.problem(
                    f"{tag}/{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt missing "
                    f"(rank {dp} of {dp_ranks})"
                )
