"""Completeness rules for DeepSpeed checkpoints (alone or inside an HF folder).

`engine.save_checkpoint(dir, tag)` writes `dir/<tag>/` with one model-states
file per model-parallel rank and, under ZeRO, one optimizer-states file per
data-parallel rank, then writes `dir/latest` naming the tag. So `latest` is
the marker, and every rank's file must be in the folder it names. ZeRO stage 0
keeps the optimizer inside the model states: no optimizer files is fine.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..userfiles import NotRegularFile, read_bytes
from .files import check_file
from .findings import Findings

LATEST = "latest"
_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
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
    names = {p.name for p in tag_dir.iterdir()}
    mp_ranks = _check_model_states(tag, names, found)
    if mp_ranks:
        _check_optim_states(tag, names, mp_ranks, found, world_size)
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
) -> None:
    files = [m for n in names if (m := _OPTIM_STATES.match(n))]
    if not files:
        found.note("no ZeRO optimizer files: optimizer state inside the model states")
        return
    prefix = files[0].group(1)
    have = {(int(m.group(2)), int(m.group(3))) for m in files}
    dp_ranks = max(dp for dp, _ in have) + 1
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
