"""`export_model`: merged, adapter-only and full checkpoints load with AutoModelForCausalLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftsup.trainer.export import ExportError, export_model

INPUT = torch.tensor([[1, 5, 20, 30, 40, 6]])


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits.float()


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter with non-zero weights, saved the way HF Trainer saves a checkpoint."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config)
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint-10"
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(folder))
    return folder


def reference_logits(tiny_model: Path, checkpoint: Path) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    return logits(PeftModel.from_pretrained(base, str(checkpoint)).eval())


def test_merged_export_matches_the_adapter(
    tiny_model: Path, lora_checkpoint: Path, tmp_path: Path
) -> None:
    out = export_model(lora_checkpoint, tiny_model, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = reference_logits(tiny_model, lora_checkpoint)
    assert not torch.allclose(
        expected, logits(AutoModelForCausalLM.from_pretrained(str(tiny_model)))
    )
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(str(out)).decode([1]) == "<s>"


def test_adapter_export_loads_through_transformers(
    tiny_model: Path, lora_checkpoint: Path, tmp_path: Path
) -> None:
    out = export_model(lora_checkpoint, None, tmp_path / "adapter", merge=False)
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(model), reference_logits(tiny_model, lora_checkpoint))


def test_half_precision_and_full_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    out = export_model(tiny_model, None, tmp_path / "fp16", merge=True, dtype="fp16")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert next(model.parameters()).dtype == torch.float16
    with pytest.raises(ExportError, match="not empty"):
        export_model(tiny_model, None, out, dtype="fp16")
    with pytest.raises(ExportError, match="dtype"):
        export_model(tiny_model, None, tmp_path / "x", dtype="int3")
