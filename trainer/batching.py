"""Examples as a map-style dataset, and the collator that pads them into batches.

A map-style dataset with a length lets HF Trainer (through accelerate) use its
seedable sampler, whose order depends only on the seed and the epoch; that is
what makes skipping to a resume position exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftsup.trainer.data import IGNORE_INDEX, Example


class ExampleDataset:
    """A list of tokenised examples, served as `{"input_ids", "labels"}`."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


class PadCollator:
    """Right-pad to the longest example in the batch; padded labels are ignored."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        input_ids, labels, mask = [], [], []
        for feature in features:
            pad = width - len(feature["input_ids"])
            input_ids.append(list(feature["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(feature["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * len(feature["input_ids"]) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
