"""Real checkpoints for the tests: written by transformers' Trainer, by the ftsup
manifest writer, and in DeepSpeed's layout (files written with torch.save).

torch and transformers are imported inside the functions: only the tests that
build or resume a model pay for them, and `supervisor/` never sees them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

from ftsup.supervisor.checkpoints.drift_guard import make_fingerprint
from ftsup.supervisor.manifest import build_manifest, write_manifest

MAX_STEPS = 6
SAVE_STEPS = 2
VOCAB = 64
SEQ = 16


def tiny_model() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ * 2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def random_tokens(count: int = 64) -> Any:
    import torch

    class Tokens(torch.utils.data.Dataset[dict[str, Any]]):
        def __len__(self) -> int:
            return count

        def __getitem__(self, index: int) -> dict[str, Any]:
            generator = torch.Generator().manual_seed(index)
            ids = torch.randint(0, VOCAB, (SEQ,), generator=generator)
            return {"input_ids": ids, "labels": ids}

    return Tokens()


def train(
    output_dir: Path, *, resume_from: Path | None = None, save_only_model: bool = False
) -> Any:
    """Train the tiny model to MAX_STEPS, saving every SAVE_STEPS; the Trainer."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_only_model=save_only_model,
        seed=0,
    )
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=random_tokens())
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer


def checkpoints(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def make_two_rank(output_dir: Path) -> None:
    """As if two processes had saved: one RNG file per rank."""
    for ckpt in checkpoints(output_dir):
        rng = ckpt / "rng_state.pth"
        shutil.copy(rng, ckpt / "rng_state_0.pth")
        shutil.copy(rng, ckpt / "rng_state_1.pth")
        rng.unlink()


def add_manifests(output_dir: Path, *, world_size: int = 1) -> None:
    """What the built-in trainer does after the HF save: the manifest, last."""
    fingerprint = make_fingerprint(
        model="tiny-llama",
        dataset="random",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        world_size=world_size,
        cutoff_len=SEQ,
    )
    for ckpt in checkpoints(output_dir):
        step = int(ckpt.name.split("-")[1])
        manifest = build_manifest(
            ckpt, step=step, world_size=world_size, fingerprint=fingerprint, created_at=time.time()
        )
        write_manifest(ckpt, manifest)


def make_sharded(output_dir: Path) -> None:
    """model.safetensors split into two shards plus the index, as save_pretrained does."""
    from safetensors.torch import load_file, save_file

    for ckpt in checkpoints(output_dir):
        tensors = load_file(ckpt / "model.safetensors")
        names = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2]}
        halves["model-00002-of-00002.safetensors"] = names[len(names) // 2 :]
        weight_map = {}
        for shard, keys in halves.items():
            save_file({k: tensors[k] for k in keys}, ckpt / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, shard))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        (ckpt / "model.safetensors").unlink()


def make_deepspeed(output_dir: Path, *, steps: tuple[int, ...] = (2, 4, 6), ranks: int = 2) -> None:
    """DeepSpeed's own layout: checkpoint-N/{latest, global_stepN/...} (ZeRO, 1 mp rank)."""
    import torch

    for step in steps:
        tag = f"global_step{step}"
        folder = output_dir / f"checkpoint-{step}" / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"module": {"w": torch.randn(8, 8)}, "step": step},
            folder / "mp_rank_00_model_states.pt",
        )
        for rank in range(ranks):
            state = {"optimizer_state_dict": {"exp_avg": torch.randn(64)}, "rank": rank}
            torch.save(state, folder / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        (output_dir / f"checkpoint-{step}" / "latest").write_text(tag)


def make_hf_deepspeed(output_dir: Path) -> None:
    """An HF Trainer checkpoint saved through DeepSpeed: optimizer and scheduler
    live in the DeepSpeed folder, not in optimizer.pt / scheduler.pt."""
    for ckpt in checkpoints(output_dir):
        (ckpt / "optimizer.pt").unlink()
        (ckpt / "scheduler.pt").unlink()
    make_deepspeed(output_dir, steps=(2, 4, 6), ranks=1)


def strip_training_state(output_dir: Path) -> None:
    """What `save_only_model=True` leaves: weights, config and trainer state only."""
    for ckpt in checkpoints(output_dir):
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (ckpt / name).unlink()


# -- damage -------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero(path: Path) -> None:
    path.write_bytes(b"")


def delete(path: Path) -> None:
    path.unlink()


def flip_bit(path: Path) -> None:
    """Flip one bit in the payload: inside the largest zip member of a torch
    file, inside the tensor data of a safetensors file, mid-file otherwise."""
    data = bytearray(path.read_bytes())
    offset = _payload_offset(path, bytes(data))
    data[offset] ^= 0x01 if path.suffix == ".json" else 0x10
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _payload_offset(path: Path, data: bytes) -> int:
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as archive:
            member = max(archive.infolist(), key=lambda m: m.compress_size)
        local = member.header_offset
        name_len, extra_len = struct.unpack("<HH", data[local + 26 : local + 30])
        return local + 30 + name_len + extra_len + member.compress_size // 2
    if path.suffix == ".safetensors":
        (header_len,) = struct.unpack("<Q", data[:8])
        return 8 + header_len + (len(data) - 8 - header_len) // 2
    if path.suffix == ".json":  # a digit inside a number: still valid JSON
        digits = b"0123456789"
        return next(
            i
            for i in range(len(data) // 2, len(data))
            if data[i] in digits and data[i - 1] in digits
        )
    return len(data) // 2


DAMAGE = {"truncated": truncate, "zero-length": zero, "deleted": delete, "bit-flipped": flip_bit}
