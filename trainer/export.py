"""`ftsup export`: a checkpoint as a standalone model that `from_pretrained` loads.

A LoRA checkpoint is either merged into its base model (one ordinary model
folder, no peft needed to use it) or exported as an adapter folder that names
its base (transformers loads it when peft is installed). A full fine-tuning
checkpoint is re-saved without the optimizer and trainer state; one whose
weights exist only as DeepSpeed ZeRO or FSDP (DCP) shards is consolidated
first. The result is
written to a temporary folder and renamed, so a crash never leaves half a model
at `out_dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says why."""


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ExportError(f"dtype {name!r}: use one of {', '.join(sorted(set(DTYPES)))}")
    return getattr(torch, DTYPES[name])


def adapter_base(checkpoint_dir: Path) -> str | None:
    """The base model a LoRA checkpoint was trained on, as recorded by peft."""
    config = Path(checkpoint_dir) / "adapter_config.json"
    if not config.exists():
        return None
    value = json.loads(config.read_text()).get("base_model_name_or_path")
    return str(value) if value else None


def export_model(
    checkpoint_dir: Path,
    base_model: str | Path | None,
    out_dir: Path,
    merge: bool = True,
    dtype: str = "float32",
    *,
    overwrite: bool = False,
) -> Path:
    """Write a standalone model for `checkpoint_dir` to `out_dir` and return it.

    `base_model` defaults to the one recorded in the adapter config.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    torch_dtype = _torch_dtype(dtype)
    if not checkpoint_dir.is_dir():
        raise ExportError(f"{checkpoint_dir}: no such checkpoint folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty (pass overwrite to replace it)")
    is_lora = (checkpoint_dir / "adapter_config.json").exists()
    base = str(base_model) if base_model else adapter_base(checkpoint_dir)
    if is_lora and not base:
        raise ExportError(f"{checkpoint_dir}: a LoRA checkpoint needs its base model")
    tmp = out_dir.with_name(f".{out_dir.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if is_lora and merge:
            _export_merged(checkpoint_dir, str(base), tmp, torch_dtype)
        elif is_lora:
            _export_adapter(checkpoint_dir, str(base), tmp, torch_dtype)
        else:
            _export_full(checkpoint_dir, base, tmp, torch_dtype)
        _copy_tokenizer(checkpoint_dir if _has_tokenizer(checkpoint_dir) else Path(str(base)), tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _export_merged(checkpoint_dir: Path, base: str, out: Path, dtype: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # Merge in float32, then cast: merging in half precision loses the adapter's small deltas.
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    merged = PeftModel.from_pretrained(model, str(checkpoint_dir)).merge_and_unload()
    merged.to(dtype).save_pretrained(str(out), safe_serialization=True)


def _export_adapter(checkpoint_dir: Path, base: str, out: Path, dtype: Any) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(checkpoint_dir / "adapter_model.safetensors"))
    save_file({k: v.to(dtype) for k, v in weights.items()}, str(out / "adapter_model.safetensors"))
    config = json.loads((checkpoint_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def _export_full(checkpoint_dir: Path, base: str | None, out: Path, dtype: Any) -> None:
    from transformers import AutoModelForCausalLM

    sharded = _model_from_shards(checkpoint_dir, base, out)
    if sharded is not None:
        sharded.to(dtype).save_pretrained(str(out), safe_serialization=True)
        return
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=dtype)
    model.save_pretrained(str(out), safe_serialization=True)


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
DCP_MODEL_FOLDER = "pytorch_model_fsdp_0"  # accelerate's sharded FSDP weights (DCP)


def _model_from_shards(checkpoint_dir: Path, base: str | None, scratch: Path) -> Any | None:
    """The consolidated model of a checkpoint with no HF weights file, whose weights
    exist only as DeepSpeed ZeRO shards (a config with
    stage3_gather_16bit_weights_on_model_save = false: a `latest`) or as FSDP's
    sharded state dict (DCP); None: an ordinary HF checkpoint."""
    if any((checkpoint_dir / name).exists() for name in _WEIGHT_FILES):
        return None
    if (checkpoint_dir / "latest").is_file():
        return _model_from_zero_shards(checkpoint_dir)
    if (checkpoint_dir / DCP_MODEL_FOLDER / ".metadata").is_file():
        return _model_from_dcp_shards(checkpoint_dir, base, scratch)
    return None


def _model_from_zero_shards(checkpoint_dir: Path) -> Any:
    """Consolidate the ZeRO-2/3 shards into fp32 weights (DeepSpeed's zero_to_fp32,
    on CPU, any number of ranks) and put them into the checkpoint's model config."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as exc:
        raise ExportError(
            f"{checkpoint_dir} holds its weights only as DeepSpeed ZeRO shards; "
            "install deepspeed to consolidate them (pip install 'ftsup[train]')"
        ) from exc
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    return _model_with_state(str(checkpoint_dir), state, f"{checkpoint_dir}: the ZeRO shards")


def _model_with_state(config_source: str, state: dict[str, Any], what: str) -> Any:
    """The model of `config_source`'s config holding `state` (tied weights re-tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_source)
    dtype = state[next(iter(state))].dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise ExportError(
            f"{what} do not match the model "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    if missing:
        model.tie_weights()
    return model


def _model_from_dcp_shards(checkpoint_dir: Path, base: str | None, scratch: Path) -> Any:
    """Consolidate FSDP's DCP shards (any number of ranks, one process, no process
    group: torch's own offline converter) and put them into the model's config:
    the checkpoint's config.json (ftsup's trainer writes it), else `base`, else the
    model its manifest records."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    source = _config_source(checkpoint_dir, base)
    consolidated = scratch / ".consolidated.pt"
    try:
        dcp_to_torch_save(str(checkpoint_dir / DCP_MODEL_FOLDER), str(consolidated))
        saved = torch.load(consolidated, map_location="cpu", weights_only=True)
    finally:
        consolidated.unlink(missing_ok=True)
    state = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not state:
        raise ExportError(f"{checkpoint_dir / DCP_MODEL_FOLDER}: no model weights in the shards")
    return _model_with_state(source, state, f"{checkpoint_dir}: the FSDP shards")


def _config_source(checkpoint_dir: Path, base: str | None) -> str:
    if (checkpoint_dir / "config.json").is_file():
        return str(checkpoint_dir)
    if base:
        return base
    from ftsup.supervisor.manifest import ManifestError, read_manifest

    try:
        recorded = read_manifest(checkpoint_dir).fingerprint.get("model")
    except ManifestError:
        recorded = None
    if isinstance(recorded, str) and recorded:
        return recorded
    raise ExportError(
        f"{checkpoint_dir}: its FSDP shards carry no config.json; name the model they belong "
        "to with --base MODEL"
    )


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in _TOKENIZER_FILES)


def _copy_tokenizer(source: Path, out: Path) -> None:
    """Tokenizer files travel with the model (hub ids are loaded and re-saved)."""
    from transformers import AutoTokenizer

    if not source.exists() and not _looks_like_hub_id(str(source)):
        return
    with contextlib.suppress(OSError, ValueError):  # a model without a tokenizer is still one
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out))


def _looks_like_hub_id(name: str) -> bool:
    return "/" in name and not name.startswith(("/", "."))
