"""The memory tier's snapshot format: raw tensors in a mapped file, a small pickle, a seal.

Why not an HF checkpoint folder (what the tier wrote first): writing one is
pickling, safetensors and JSON in the training process's Python, 15-25 ms per
snapshot of the tiny LoRA job, most of it holding the GIL the training loop
needs, so every step got slower. A snapshot here is, on the training thread:

* a copy of every tensor training changes (trainable weights and buffers,
  optimizer state, the CPU RNG state) into one file in tmpfs that stays mapped
  from one snapshot to the next (`tensors.bin`; the copies are memcpy in ATen);
* a pickle of the few KB that are not tensors, with `TensorRef`s where tensors
  were (`state.pkl`: optimizer param groups, scheduler, scaler, RNG, the
  TrainerState without its log history);
* the log entries added since this slot's previous snapshot, appended to its
  `history.jsonl` (the history only grows: rewriting it every step would cost
  more as training goes on);
* the record (`MEMORY_RECORD`: job, lineage, step, attempt, fingerprint and
  every file's size), written last and atomically: it is the seal.

No checksums: one process writes the files and then the seal, so a kill leaves
either no seal or every byte before it, and tmpfs does not outlive the host,
so there is no torn page after a power loss to find. Torn writes are told by
the missing seal; the daemon also checks the sizes (`supervisor.memory_tier`).

A resume turns a snapshot back into the folder an HF disk save would have
written (`materialize`, through `async_save.write_files`), so HF's own
`resume_from_checkpoint` loads it: bit-identical by construction.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftsup.supervisor.contract import MEMORY_FORMAT, MEMORY_RECORD
from ftsup.supervisor.memory_tier import read_record
from ftsup.trainer.async_save import (
    RNG_STATE_NAME,
    Captured,
    record_callback_states,
    rng_states,
    write_files,
)

TENSORS_NAME = "tensors.bin"
STATE_NAME = "state.pkl"
HISTORY_NAME = "history.jsonl"
_ALIGN = 64  # every tensor starts on a cache line (and any dtype's alignment)
MODEL_CARD_NAME = "README.md"  # written by peft's save_pretrained
_PENDING_WINDOW = "_ftsup_resumed_loss_window"  # set by materialize, taken by the first epoch

# Called with each fault point of a write ("memory_after_tensors", "memory_before_seal").
PointHook = Callable[[str], None]


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's bytes lie in `tensors.bin` (the pickle holds these instead)."""

    offset: int
    dtype: str  # torch dtype name without "torch."
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * _dtype(self.dtype).itemsize


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} in a memory snapshot")
    return dtype


class _Layout:
    """Assigns each tensor met while walking the state its place in `tensors.bin`."""

    def __init__(self) -> None:
        self.size = 0
        self.sources: list[torch.Tensor] = []
        self.refs: list[TensorRef] = []
        self._seen: dict[int, TensorRef] = {}

    def ref(self, tensor: torch.Tensor) -> TensorRef:
        known = self._seen.get(id(tensor))  # tied weights: one copy
        if known is not None:
            return known
        source = tensor.detach()
        offset = -(-self.size // _ALIGN) * _ALIGN
        ref = TensorRef(offset, str(source.dtype).removeprefix("torch."), tuple(source.shape))
        self.size = offset + source.numel() * source.element_size()
        self.sources.append(source)
        self.refs.append(ref)
        self._seen[id(tensor)] = ref
        return ref

    def skeleton(self, value: Any) -> Any:
        """`value` (nested dicts/lists/tuples) with each tensor replaced by its ref."""
        return _map_leaves(value, torch.Tensor, self.ref)


def _map_leaves(value: Any, leaf: type, change: Callable[[Any], Any]) -> Any:
    """`value` (nested dicts, lists, plain tuples) with every `leaf` replaced by
    `change(leaf)`: tensors by refs when writing, refs by tensors when loading."""
    if isinstance(value, leaf):
        return change(value)
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_leaves(v, leaf, change) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_map_leaves(v, leaf, change) for v in value)
    return value


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors of `value` in the order `_Layout.skeleton` meets them."""
    found: list[torch.Tensor] = []
    _map_leaves(value, torch.Tensor, found.append)  # the same walk as the skeleton's
    return found


def torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's wrapper (which only forwards to it)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _plan_key(optimizer: Any, loss_window: torch.Tensor | None) -> tuple[int, ...] | None:
    """What a plan depends on: the parameters' and the state tensors' identities, in
    `state_dict()`'s order (a new tensor, or an int step count replaced by the next,
    is a new object). None when no plan can be kept: state-dict hooks may change
    what `state_dict()` returns."""
    if not isinstance(optimizer, torch.optim.Optimizer) or (
        optimizer._optimizer_state_dict_pre_hooks or optimizer._optimizer_state_dict_post_hooks
    ):
        return None
    ids = [id(loss_window)]
    for group in optimizer.param_groups:
        ids.extend(map(id, group["params"]))
    ids.append(-1)  # parameters | state
    for per in optimizer.state.values():
        ids.extend(map(id, per.values()))
    return tuple(ids)


@dataclass(frozen=True)
class _Plan:
    """Where each tensor training changes goes; the same from one snapshot to the
    next as long as the optimizer holds the same tensor objects (they are updated
    in place), so walking the model's state dict and pickling the refs happen once.
    The plan holds the tensors, so no id in `key` can be reused."""

    key: tuple[int, ...] | None  # _plan_key; None: built for one snapshot only
    sources: list[torch.Tensor]
    refs: tuple[TensorRef, ...]
    size: int
    pickled: bytes  # {"weights": {name: ref}, "optimizer_state": skeleton, "tr_loss": ref}
    group_params: tuple[list[int], ...]  # state_dict()'s param indices, group by group


def _plan(
    model: torch.nn.Module,
    optimizer_state_dict: dict[str, Any],
    loss_window: torch.Tensor | None,
    key: tuple[int, ...] | None,
) -> _Plan:
    layout = _Layout()
    weights: dict[str, TensorRef] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        # Frozen parameters (a LoRA run's whole base model) never change: not copied.
        if isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad:
            continue
        weights[name] = layout.ref(tensor)
    state = optimizer_state_dict["state"]
    skeleton = layout.skeleton(state)
    if len(_tensors_in(state)) != sum(len(per) for per in state.values()):
        key = None  # a value that is not a tensor (an int step count) is in the pickle
    loss = None if loss_window is None else layout.ref(loss_window)
    frozen = {"weights": weights, "optimizer_state": skeleton, "tr_loss": loss}
    return _Plan(
        key=key,
        sources=layout.sources,
        refs=tuple(layout.refs),
        size=layout.size,
        pickled=pickle.dumps(frozen, protocol=pickle.HIGHEST_PROTOCOL),
        group_params=tuple(list(g["params"]) for g in optimizer_state_dict["param_groups"]),
    )


def _packed_groups(optimizer: torch.optim.Optimizer, plan: _Plan) -> list[dict[str, Any]]:
    """`optimizer.state_dict()["param_groups"]` without walking the state again:
    each group's settings (now) and its parameters' indices (the plan's)."""
    return [
        {**{k: v for k, v in group.items() if k != "params"}, "params": indices}
        for group, indices in zip(optimizer.param_groups, plan.group_params, strict=True)
    ]


def _loss_window(trainer: Any) -> torch.Tensor | None:
    """HF's loss accumulator since the last logged step (`Trainer._tr_loss`, updated in
    place; a private attribute of transformers 5): with it, the first loss logged after
    a resume in mid-window averages the same steps as without the kill."""
    value = getattr(trainer, "_tr_loss", None)
    return value if isinstance(value, torch.Tensor) and value.dim() == 0 else None


def _rng_to_pickle(states: dict[str, Any]) -> dict[str, Any]:
    """RNG states with tensors as bytes (a pickled tensor goes through torch.save)."""

    def raw(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", str(value.dtype).removeprefix("torch."), value.numpy().tobytes())
        if isinstance(value, list):
            return [raw(v) for v in value]
        return value

    return {
        name: raw(value) if name in ("cpu", "cuda") else value for name, value in states.items()
    }


def _rng_from_pickle(states: dict[str, Any]) -> dict[str, Any]:
    def tensor(value: Any) -> Any:
        if isinstance(value, tuple) and value[:1] == ("tensor",):
            return torch.frombuffer(bytearray(value[2]), dtype=_dtype(value[1])).clone()
        if isinstance(value, list):
            return [tensor(v) for v in value]
        return value

    return {
        name: tensor(value) if name in ("cpu", "cuda") else value for name, value in states.items()
    }


def _trainer_state_without_history(trainer: Any) -> Any:
    state = copy.copy(trainer.state)  # shallow: the pickle below is the copy
    state.log_history = []
    return state


class TensorFile:
    """`tensors.bin` of one slot folder, mapped shared, with the views of a plan."""

    def __init__(self, path: Path, size: int) -> None:
        self.size = size
        self.buffer = torch.from_file(str(path), shared=True, size=max(size, 1), dtype=torch.uint8)
        if os.path.getsize(path) != max(size, 1):
            os.truncate(path, max(size, 1))  # a bigger file of an older layout
        self._views: tuple[tuple[TensorRef, ...], list[torch.Tensor]] | None = None

    def views(self, refs: tuple[TensorRef, ...]) -> list[torch.Tensor]:
        if self._views is None or self._views[0] is not refs:
            views = [
                self.buffer[r.offset : r.offset + r.nbytes].view(_dtype(r.dtype)).view(r.shape)
                for r in refs
            ]
            self._views = (refs, views)
        return self._views[1]


@dataclass
class SlotHistory:
    """How much of the log history this attempt has written into a slot's file."""

    entries: int = 0
    size: int = 0


class SnapshotWriter:
    """Writes one trainer's snapshots; keeps what does not change between them
    (the plan, and each slot folder's mapped tensor file)."""

    def __init__(self) -> None:
        self._plan: _Plan | None = None
        self._files: dict[Path, TensorFile] = {}

    def moved(self, old: Path, new: Path) -> None:
        """A slot folder was renamed (a new step): its mapping stays valid."""
        mapped = self._files.pop(old / TENSORS_NAME, None)
        if mapped is not None:
            self._files[new / TENSORS_NAME] = mapped

    def forget(self, folder: Path) -> None:
        self._files.pop(folder / TENSORS_NAME, None)

    def write(
        self,
        trainer: Any,
        folder: Path,
        history: SlotHistory | None,
        record: Mapping[str, Any],
        point: PointHook,
    ) -> tuple[int, SlotHistory]:
        """Write the trainer's state into `folder` (an unsealed slot folder) and seal
        it. `history`: what this attempt wrote into the folder's history file
        before (None: rewrite it). Returns the snapshot's size and the new history."""
        if trainer.hp_search_backend is None:
            trainer.store_flos()  # as before a disk save: total_flos is current
        record_callback_states(trainer)
        optimizer = torch_optimizer(trainer.optimizer)
        loss_window = _loss_window(trainer)
        key = _plan_key(optimizer, loss_window)
        plan = self._plan
        if plan is None or key is None or plan.key != key:
            state_dict = optimizer.state_dict()
            plan = _plan(trainer.model, state_dict, loss_window, key)
            param_groups = state_dict["param_groups"]
            self._plan = plan if plan.key is not None else None
        else:
            param_groups = _packed_groups(optimizer, plan)
        tensor_path = folder / TENSORS_NAME
        mapped = self._files.get(tensor_path)
        if mapped is None or mapped.size != plan.size:
            mapped = self._files[tensor_path] = TensorFile(tensor_path, plan.size)
        if plan.refs:
            with torch.no_grad():
                torch._foreach_copy_(mapped.views(plan.refs), plan.sources)
        point("memory_after_tensors")
        start, appended, history_data = _history_update(trainer.state.log_history, history)
        _write_history(folder / HISTORY_NAME, history_data, start)
        scaler = getattr(trainer.accelerator, "scaler", None)
        state = pickle.dumps(
            {
                "step": trainer.state.global_step,
                "plan": plan.pickled,
                "param_groups": param_groups,
                "scheduler": trainer.lr_scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "rng": _rng_to_pickle(rng_states(trainer)),
                "trainer_state": _trainer_state_without_history(trainer),
                "history": {"entries": appended.entries, "bytes": appended.size},
                "last_logged": getattr(trainer, "_globalstep_last_logged", None),
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        _write_bytes(folder / STATE_NAME, state)
        point("memory_before_seal")
        sizes = {
            TENSORS_NAME: max(plan.size, 1),
            STATE_NAME: len(state),
            HISTORY_NAME: appended.size,
        }
        seal(folder, {**record, "format": MEMORY_FORMAT, "files": sizes})
        return sum(sizes.values()), appended


def _history_update(
    log: list[dict[str, Any]], known: SlotHistory | None
) -> tuple[SlotHistory | None, SlotHistory, bytes]:
    """What to append to the slot's history file (`known`: what this attempt wrote
    there before): (the file's part to keep, None to rewrite it; the history after
    this snapshot; the bytes to write). Rewritten when this attempt has not written
    it yet: it may hold another attempt's, or be cut short."""
    start = known if known is not None and known.entries <= len(log) else None
    new = log[start.entries :] if start is not None else log
    data = "".join(json.dumps(entry) + "\n" for entry in new).encode()
    size = len(data) if start is None else start.size + len(data)
    return start, SlotHistory(len(log), size), data


def _write_history(path: Path, data: bytes, known: SlotHistory | None) -> None:
    """Append `data` to what this attempt wrote before (`known`), or write it whole."""
    if known is None:
        _write_bytes(path, data)
    elif data:
        with open(path, "r+b") as handle:
            handle.truncate(known.size)
            handle.seek(known.size)
            handle.write(data)


def _write_bytes(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
    finally:
        os.close(descriptor)


def _seal_bytes(folder: Path, record: bytes) -> None:
    temporary = folder / f".{MEMORY_RECORD}.tmp"
    _write_bytes(temporary, record)
    os.replace(temporary, folder / MEMORY_RECORD)


def seal(folder: Path, record: Mapping[str, Any]) -> None:
    """Write the record atomically: from now on the snapshot may be resumed."""
    _seal_bytes(folder, json.dumps(dict(record)).encode())


def unseal(folder: Path) -> None:
    """Remove the seal (best effort): the daemon then never picks this snapshot."""
    with contextlib.suppress(OSError):
        (Path(folder) / MEMORY_RECORD).unlink(missing_ok=True)


def is_snapshot(folder: Path) -> bool:
    """Whether `folder` is a sealed snapshot of this format (not an HF checkpoint)."""
    record = read_record(folder)
    return record is not None and record.get("format") == MEMORY_FORMAT


@dataclass(frozen=True)
class SnapshotContents:
    """A sealed snapshot read back: the tensors training changed and the rest."""

    state: dict[str, Any]  # state.pkl (step, param_groups, scheduler, scaler, rng, ...)
    weights: dict[str, torch.Tensor]  # the trainable weights (and buffers) by name
    optimizer: dict[str, Any]  # as `optimizer.state_dict()` returned it
    loss_window: torch.Tensor | None  # HF's loss accumulator


def read_snapshot(snapshot: Path) -> SnapshotContents:
    """What `materialize` writes out, as tensors and dicts."""
    snapshot = Path(snapshot)
    state = pickle.loads((snapshot / STATE_NAME).read_bytes())
    size = os.path.getsize(snapshot / TENSORS_NAME)
    data = torch.from_file(str(snapshot / TENSORS_NAME), shared=False, size=size, dtype=torch.uint8)

    def tensor(ref: TensorRef) -> torch.Tensor:
        raw = data[ref.offset : ref.offset + ref.nbytes]
        return raw.view(_dtype(ref.dtype)).view(ref.shape).clone()

    def load(value: Any) -> Any:
        return _map_leaves(value, TensorRef, tensor)

    plan = pickle.loads(state["plan"])
    loss = plan.get("tr_loss")
    return SnapshotContents(
        state=state,
        weights=load(plan["weights"]),
        optimizer={"state": load(plan["optimizer_state"]), "param_groups": state["param_groups"]},
        loss_window=None if loss is None else tensor(loss),
    )


def materialize(snapshot: Path, trainer: Any, out: Path) -> Path:
    """Write `snapshot` as the checkpoint folder an HF save of its step would be,
    at `out` (replaced), for `trainer.train(resume_from_checkpoint=...)`."""
    contents = read_snapshot(snapshot)
    state = contents.state
    weights = dict(trainer.model.state_dict())
    weights.update(contents.weights)
    trainer_state = state["trainer_state"]
    trainer_state.log_history = _read_history(Path(snapshot) / HISTORY_NAME, state["history"])
    captured = Captured(
        step=state["step"],
        rank=0,
        model=trainer.model,
        weights=weights,
        optimizer=contents.optimizer,
        scheduler=state["scheduler"],
        scaler=state["scaler"],
        state=trainer_state,
        tokenizer=None,
        args=trainer.args,
    )
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # peft then updates this model card instead of rendering its template (jinja:
    # 20 of the 40 ms this takes on the tiny job, on the restart's critical path).
    (out / MODEL_CARD_NAME).write_text("---\nlibrary_name: peft\n---\n")

    def part(_point: str | None, action: Callable[[], object]) -> None:
        action()

    write_files(captured, out, part)
    torch.save(_rng_from_pickle(state["rng"]), out / RNG_STATE_NAME)
    if contents.loss_window is not None and isinstance(state.get("last_logged"), int):
        setattr(trainer, _PENDING_WINDOW, (contents.loss_window, state["last_logged"]))
    return out


def restore_loss_window(trainer: Any) -> None:
    """Once, as training starts after `materialize`: HF's loss accumulator and the
    step last logged as they were at the snapshot (HF starts both afresh on a resume,
    right for a disk checkpoint, which falls on a logging step, but not here)."""
    pending = trainer.__dict__.pop(_PENDING_WINDOW, None)
    window = _loss_window(trainer)
    if pending is None or window is None or not hasattr(trainer, "_globalstep_last_logged"):
        return
    value, last_logged = pending
    with torch.no_grad():
        window.copy_(value)
    trainer._globalstep_last_logged = last_logged


def _read_history(path: Path, extent: Mapping[str, int]) -> list[dict[str, Any]]:
    with open(path, "rb") as handle:
        data = handle.read(extent["bytes"])
    entries = [json.loads(line) for line in data.splitlines()]
    if len(data) != extent["bytes"] or len(entries) != extent["entries"]:
        raise ValueError(f"{path}: the log history is shorter than its snapshot says")
    return entries
