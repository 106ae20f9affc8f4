"""A plain Hugging Face Trainer script that only adds `FtsupCallback` (used by a test).

Usage: python hf_script.py MODEL_DIR OUTPUT_DIR MAX_STEPS
Exits 75 when training stopped on request, 0 otherwise: the script decides.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from ftsup.trainer import FtsupCallback


class Numbers(torch.utils.data.Dataset):  # type: ignore[misc]
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor([1, *[10 + (index + i) % 10 for i in range(8)], 2])
        return {"input_ids": ids, "labels": ids.clone()}


def main() -> int:
    model_dir, output_dir, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    callback = FtsupCallback()
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=TrainingArguments(
            output_dir=output_dir,
            max_steps=max_steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            save_strategy="no",
            logging_steps=1,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=Numbers(),
        callbacks=[callback],
    )
    trainer.train()
    return 75 if callback.stopped else 0


if __name__ == "__main__":
    sys.exit(main())
