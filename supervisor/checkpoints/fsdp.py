"""Completeness rules for FSDP's sharded saves (torch.distributed.checkpoint folders).

HF Trainer under FSDP with SHARDED_STATE_DICT writes `pytorch_model_fsdp_0/`
and `optimizer_0/`, each a DCP folder: every rank writes its own
`__<rank>_<n>.distcp`, then the coordinator (rank 0) writes `.metadata` once
all ranks reported their writes. `.metadata` maps every tensor chunk to a
file, an offset and a length, so it says which shards must exist and how
large each must at least be: a missing or truncated rank shard is seen from
the metadata alone, without a manifest and without the world size.

`.metadata` is a pickle. It is never unpickled with torch (no code from a
checkpoint runs, and validation stays torch-free): a restricted unpickler
builds inert stand-ins for the torch.distributed.checkpoint classes it names
and refuses every other global. Checked against real torch 2.13 output
(tests/trainer/test_fsdp.py damages checkpoints the built-in trainer wrote).
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

from ..userfiles import NotRegularFile, read_bytes
from .findings import Findings

DCP_DIR = re.compile(r"^(pytorch_model_fsdp|optimizer)_\d+$")
METADATA = ".metadata"
_SHARD = re.compile(r"^__(\d+)_(\d+)\.distcp$")
_METADATA_LIMIT = 512 * 1024 * 1024
# Globals a DCP .metadata may name; each becomes an inert stand-in class.
_ALLOWED_MODULES = ("torch", "pathlib", "collections")


def is_fsdp(folder: Path) -> bool:
    """An HF checkpoint with at least one DCP folder (FSDP's sharded state dicts)."""
    return any(DCP_DIR.match(p.name) and p.is_dir() for p in folder.iterdir())


def check_fsdp(
    folder: Path, found: Findings, *, world_size: int | None, deep: bool = False
) -> None:
    """Every DCP folder complete; all of them written by the same ranks.

    `deep` adds nothing here: the bytes of a `.distcp` have no checksum of
    their own (the manifest's hashes cover them).
    """
    ranks_by_dir: dict[str, set[int]] = {}
    for path in sorted(folder.iterdir()):
        if DCP_DIR.match(path.name) and path.is_dir():
            ranks = check_dcp_folder(path, found, label=path.name, world_size=world_size)
            if ranks:
                ranks_by_dir[path.name] = ranks
    every = set().union(*ranks_by_dir.values()) if ranks_by_dir else set()
    for name, ranks in ranks_by_dir.items():
        for rank in sorted(every - ranks):
            found.problem(f"{name}/__{rank}_0.distcp missing (other folders have rank {rank})")
    if every:
        found.details["world_size"] = max(max(every) + 1, world_size or 0)


def check_dcp_folder(
    folder: Path, found: Findings, *, label: str, world_size: int | None = None
) -> set[int]:
    """One DCP folder: `.metadata` readable, each shard it names present and long
    enough, a shard for every rank below `world_size`. The ranks seen are returned."""
    shards = {p.name: p for p in folder.iterdir() if _SHARD.match(p.name)}
    ranks = {rank for name in shards if (rank := _shard_rank(name)) is not None}
    needed = _required_sizes(folder / METADATA, found, label)
    if needed is not None:
        for name, size in sorted(needed.items()):
            if (rank := _shard_rank(name)) is not None:
                ranks.add(rank)
            _check_shard(folder / name, size, found, f"{label}/{name}")
    named = needed or {}
    for rank in range(max(world_size or 0, max(ranks) + 1 if ranks else 0)):
        if not any(_shard_rank(name) == rank for name in [*shards, *named]):
            found.problem(f"{label}/__{rank}_0.distcp missing (rank {rank} wrote no shard)")
    for name, path in sorted(shards.items()):
        if needed is None or name not in needed:
            _check_shard(path, 1, found, f"{label}/{name}")
    return ranks


def _shard_rank(name: str) -> int | None:
    match = _SHARD.match(name)
    return int(match.group(1)) if match else None


def _check_shard(path: Path, at_least: int, found: Findings, label: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        found.problem(f"{label} missing (named by {METADATA})")
        return
    if not path.is_file():
        found.problem(f"{label} is not a regular file")
    elif size == 0:
        found.problem(f"{label} is empty (0 bytes)")
    elif size < at_least:
        found.problem(f"{label} truncated: {size} bytes, {METADATA} needs at least {at_least}")


def _required_sizes(path: Path, found: Findings, label: str) -> dict[str, int] | None:
    """{shard file: bytes it must hold at least}, from `.metadata`; None if unreadable."""
    try:
        raw = read_bytes(path, limit=_METADATA_LIMIT, follow=True)
    except FileNotFoundError:
        found.problem(f"{label}/{METADATA} missing (distributed checkpoint incomplete)")
        return None
    except NotRegularFile as exc:
        found.problem(f"{label}/{METADATA} is {exc.what}, not a regular file")
        return None
    if not raw:
        found.problem(f"{label}/{METADATA} is empty (0 bytes)")
        return None
    try:
        metadata = _InertUnpickler(io.BytesIO(raw)).load()
        storage = _state(metadata)["storage_data"]
        needed: dict[str, int] = {}
        for info in storage.values():
            fields = _state(info)
            name, end = str(fields["relative_path"]), int(fields["offset"]) + int(fields["length"])
            needed[name] = max(needed.get(name, 0), end)
    except _Refused as exc:
        found.note(f"{label}/{METADATA} not read: {exc}")
        return None
    except Exception as exc:  # any damage in the pickle stream: unreadable
        found.problem(f"{label}/{METADATA} unreadable ({type(exc).__name__}: {exc})")
        return None
    return needed


class _Refused(Exception):
    """The pickle names a global outside torch.distributed.checkpoint's vocabulary."""


class _Inert:
    """Stands in for any class the metadata names: keeps arguments and state, runs nothing."""

    args: tuple[Any, ...] = ()
    state: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        if not isinstance(self.state, dict):
            self.state = {}
        self.state[key] = value


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if module.split(".")[0] not in _ALLOWED_MODULES:
            raise _Refused(f"it names {module}.{name}")
        return type(name, (_Inert,), {})


def _state(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as pickled: `__dict__`, or (dict, slots)."""
    state = obj.state if isinstance(obj, _Inert) else None
    if isinstance(state, tuple) and len(state) == 2:
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
        raise ValueError(f"unexpected {type(obj).__name__} in the metadata")
    return state
