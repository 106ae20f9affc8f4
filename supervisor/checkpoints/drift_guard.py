"""Drift guard: a resume must not silently change what the run is training on.

A checkpoint's config fingerprint (in its ftsup manifest) is compared with the
job's at resume. Changing the model, the data, the batch geometry or the number
of processes changes which samples come next (the trainer skips batches by
count) or invalidates the optimizer state; those are refused unless the user
accepts the drift. Other differences are reported but allowed.

One change of the batch geometry is exact: an elastic job (`[gpu] elastic`)
that runs on fewer (or again more) processes keeps its global batch by
changing its accumulation, and the trainer shards each global batch across
the ranks, so every step sees the same samples. When both fingerprints carry
the same `global_batch` and per-device batch, a change of world size and
accumulation is an elastic resize (`elastic_resize`): reported, not refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Rule:
    label: str
    data_order: bool
    optimizer_state: bool
    aliases: tuple[str, ...] = ()


RULES: Mapping[str, _Rule] = {
    "model": _Rule("model", True, True, ("model_name_or_path",)),
    "dataset": _Rule("dataset", True, False, ("datasets", "data")),
    "per_device_train_batch_size": _Rule(
        "per-device batch size", True, True, ("batch_size", "per_device_batch_size")
    ),
    "gradient_accumulation_steps": _Rule(
        "gradient accumulation", True, True, ("grad_accum", "gradient_accumulation")
    ),
    "world_size": _Rule("world size", True, True, ("num_processes",)),
    "global_batch": _Rule("global batch", True, True),
    "cutoff_len": _Rule(
        "sequence length",
        False,
        False,
        ("sequence_length", "max_seq_length", "seq_len", "max_length"),
    ),
    "seed": _Rule("seed", True, False),
    "finetuning_type": _Rule("fine-tuning type", False, True),
    "zero_stage": _Rule("DeepSpeed ZeRO stage", False, True),
    "fsdp": _Rule("FSDP sharding", False, True),
}


@dataclass(frozen=True)
class Drift:
    key: str
    old: Any
    new: Any
    data_order: bool
    optimizer_state: bool
    # Part of an elastic resize (same global batch): exact, so never refused.
    elastic: bool = False

    @property
    def refused(self) -> bool:
        """Resuming across this change needs `--accept-drift`."""
        return (self.data_order or self.optimizer_state) and not self.elastic

    @property
    def message(self) -> str:
        rule = RULES.get(self.key)
        label = rule.label if rule else self.key
        text = f"{label} changed from {_show(self.old)} to {_show(self.new)}"
        if self.elastic:
            return f"{text} (elastic: the global batch is kept, the data order is unchanged)"
        effects = [
            name
            for name, on in (
                ("the data order", self.data_order),
                ("the optimizer state", self.optimizer_state),
            )
            if on
        ]
        if effects:
            return f"{text}: changes {' and '.join(effects)}"
        return f"{text} (does not change the data order or the optimizer state)"


def make_fingerprint(
    *,
    model: str,
    dataset: str | Sequence[str],
    per_device_train_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    cutoff_len: int | None = None,
    seed: int | None = None,
    global_batch: int | None = None,
) -> dict[str, Any]:
    """The fingerprint a writer stores in the manifest, under the canonical names
    the guard compares (the built-in trainer should use this)."""
    data = [dataset] if isinstance(dataset, str) else list(dataset)
    fingerprint: dict[str, Any] = {
        "model": model,
        "dataset": data,
        "per_device_train_batch_size": per_device_train_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "world_size": world_size,
    }
    if cutoff_len is not None:
        fingerprint["cutoff_len"] = cutoff_len
    if seed is not None:
        fingerprint["seed"] = seed
    if global_batch is not None:
        fingerprint["global_batch"] = global_batch
    return fingerprint


def diff_fingerprints(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Drift]:
    """What changed from the checkpoint's fingerprint (`old`) to the job's (`new`).
    A key missing on either side cannot be compared and is not reported."""
    a, b = _canonical(old), _canonical(new)
    elastic = _ELASTIC_KEYS if elastic_resize(old, new) is not None else frozenset()
    drifts = []
    for key in [*RULES, *sorted((a.keys() & b.keys()) - RULES.keys())]:
        if key in a and key in b and a[key] != b[key]:
            rule = RULES.get(key)
            drifts.append(
                Drift(
                    key,
                    a[key],
                    b[key],
                    bool(rule and rule.data_order),
                    bool(rule and rule.optimizer_state),
                    elastic=key in elastic,
                )
            )
    return drifts


_ELASTIC_KEYS = frozenset({"world_size", "gradient_accumulation_steps"})


def elastic_resize(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[int, int] | None:
    """(old world size, new world size) when `old` -> `new` is an elastic resize, else None.

    Both must carry the same `global_batch` and per-device batch, each must be
    consistent (per-device batch x accumulation x world size == global batch),
    and the world size must differ.
    """
    a, b = _canonical(old), _canonical(new)
    geometry = ("global_batch", "per_device_train_batch_size")
    if any(key not in a or key not in b or a[key] != b[key] for key in geometry):
        return None
    sizes = []
    for side in (a, b):
        world, accumulation = side.get("world_size"), side.get("gradient_accumulation_steps")
        if not isinstance(world, int) or not isinstance(accumulation, int):
            return None
        if side["per_device_train_batch_size"] * accumulation * world != side["global_batch"]:
            return None
        sizes.append(world)
    return (sizes[0], sizes[1]) if sizes[0] != sizes[1] else None


def elastic_summary(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """`world size 2 -> 1, accumulation 4 -> 8, global batch 16 kept`, or None."""
    resized = elastic_resize(old, new)
    if resized is None:
        return None
    a, b = _canonical(old), _canonical(new)
    accumulation = (a["gradient_accumulation_steps"], b["gradient_accumulation_steps"])
    return (
        f"world size {resized[0]} -> {resized[1]}, "
        f"accumulation {accumulation[0]} -> {accumulation[1]}, "
        f"global batch {a['global_batch']} kept"
    )


def compare_fingerprints(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One sentence per change, naming what changed and what it affects."""
    return [d.message for d in diff_fingerprints(old, new)]


def drift_refused(drifts: Sequence[Drift]) -> bool:
    return any(d.refused for d in drifts)


def _canonical(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fingerprint.items():
        name = next((k for k, r in RULES.items() if key == k or key in r.aliases), key)
        if name == "dataset" and isinstance(value, str):
            value = [value]  # one dataset and a list of one are the same data
        out[name] = _normal(value)
    return out


def _normal(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_normal(v) for v in value)
    return value


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)
