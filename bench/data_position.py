"""How long restoring the data position takes at resume, as HF Trainer does it.

transformers 5 resumes at the saved epoch directly (no pass over earlier
epochs) and, within the epoch, wraps the train dataloader in accelerate's
`skip_first_batches`, which walks the batch sampler's index lists without
loading or collating a sample. This measures that walk on the dataloader the
built-in trainer really builds (seedable sampler, ftsup's collator), for
growing epoch sizes, resuming at the last batch of the epoch (the worst case):
time until the first batch after the resume point is in hand.

    python bench/data_position.py [--sizes 10000,100000,1000000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def measure(size: int, batch: int, repeats: int) -> dict[str, float]:
    from accelerate import skip_first_batches
    from transformers import Trainer, TrainingArguments

    from ftsup.trainer.batching import ExampleDataset, PadCollator
    from ftsup.trainer.data import Example
    from ftsup.trainer.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(build_tiny_model(Path(tmp) / "m", hidden=16))
        data = ExampleDataset([Example([1, 2, 3], [1, 2, 3])] * size)
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, use_cpu=True, report_to="none"
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(0))
        loader = trainer.get_train_dataloader()
        skip = len(loader) - 1
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            next(iter(skip_first_batches(loader, skip)))
            times.append(time.perf_counter() - began)
    return {"examples": size, "batches_skipped": skip, "median_s": statistics.median(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [measure(int(n), args.batch, args.repeats) for n in args.sizes.split(",")]
    for row in rows:
        print(
            f"{row['examples']:>9} examples, skip {row['batches_skipped']:>6} batches: "
            f"{row['median_s'] * 1000:7.1f} ms"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
