"""A memory snapshot is taken in two halves (issue 18): the capture on the training
thread, the copy, files and seal on the tier's writer thread while the next step runs.

What must hold: the snapshot is the state of its capture, though the write ends
later (HF's loss accumulator changes before the next optimizer step, so it is
taken at once; weights and optimizer state change only in that step, which
waits for the writer); the optimizer's param groups kept from the plan are what
`state_dict()` returns; a state value that is not a tensor is taken anew every
time. Real torch optimizers, schedulers and files; the trainer is the few
attributes the writer reads.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import TrainerState

from ftsup.supervisor.contract import MEMORY_SLOTS
from ftsup.trainer.memory_snapshot import SnapshotWriter, read_snapshot
from ftsup.trainer.memory_tier import MemoryTier, slot_folders


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(4, 4)
        self.base.requires_grad_(False)  # frozen: never copied
        self.adapter = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(self.base(x)))


class CountingSGD(torch.optim.SGD):
    """Keeps a list in its state that it changes in place: the same object from one
    step to the next, unlike a tensor's bytes, not in the copied tensors."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                seen = self.state[p].setdefault("seen", [])
                seen.append(len(seen) + 1)
        return super().step(closure)


def fake_trainer(optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW) -> Any:
    torch.manual_seed(0)
    model = Tiny()
    optimizer = optimizer_class(
        [
            {"params": model.adapter.parameters(), "lr": 1e-2},
            {"params": model.head.parameters(), "lr": 1e-3, "weight_decay": 0.0},
        ],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    trainer = SimpleNamespace(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        state=TrainerState(),
        hp_search_backend=None,
        store_flos=lambda: None,
        callback_handler=SimpleNamespace(callbacks=[]),
        control=object(),
        accelerator=SimpleNamespace(scaler=None),
        args=SimpleNamespace(parallel_mode=None),
        _tr_loss=torch.tensor(0.0),
        _globalstep_last_logged=0,
    )
    return trainer


def train_step(trainer: Any) -> None:
    """Backward, the loss accumulator (changed in place before the optimizer step,
    as HF does), the optimizer and scheduler steps."""
    loss = trainer.model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    trainer._tr_loss += loss.detach()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    trainer.lr_scheduler.step()
    trainer.state.global_step += 1


def capture_and_write(writer: SnapshotWriter, trainer: Any, folder: Path) -> Any:
    finish = writer.capture(trainer, None, {"step": trainer.state.global_step})
    folder.mkdir(parents=True)
    return finish


def assert_same(actual: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    else:
        assert actual == expected


def clone_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: clone_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone_state(v) for v in value]
    return value


def test_a_snapshot_is_the_state_of_its_capture_though_written_later(tmp_path: Path) -> None:
    trainer = fake_trainer()
    writer = SnapshotWriter()
    for step in (1, 2):  # the second snapshot uses the plan the first made
        train_step(trainer)
        expected_optimizer = clone_state(trainer.optimizer.state_dict())
        expected_weights = {
            name: p.detach().clone()
            for name, p in trainer.model.named_parameters()
            if p.requires_grad
        }
        expected_loss = trainer._tr_loss.clone()
        folder = tmp_path / f"checkpoint-{step}"
        finish = capture_and_write(writer, trainer, folder)
        trainer._tr_loss += 5.0  # the next step's forward pass, before its optimizer step
        finish(folder, lambda point: None)
        contents = read_snapshot(folder)
        assert contents.state["step"] == step
        assert_same(contents.optimizer, expected_optimizer)  # param groups: the lr of now
        assert_same(contents.weights, expected_weights)
        assert contents.loss_window is not None
        assert torch.equal(contents.loss_window, expected_loss)
    assert expected_optimizer["param_groups"][0]["lr"] != 1e-2  # the scheduler moved it


def test_a_state_value_that_is_not_a_tensor_is_taken_anew_each_time(tmp_path: Path) -> None:
    trainer = fake_trainer(CountingSGD)
    writer = SnapshotWriter()
    for step in (1, 2, 3):
        train_step(trainer)
        folder = tmp_path / f"checkpoint-{step}"
        capture_and_write(writer, trainer, folder)(folder, lambda point: None)
        state = list(read_snapshot(folder).optimizer["state"].values())
        assert [per["seen"] for per in state] == [list(range(1, step + 1))] * len(state)


def test_the_next_optimizer_step_waits_for_the_writer_thread(tmp_path: Path) -> None:
    """The write is held back before its copy; the optimizer step right after the
    snapshot must wait for it, or the snapshot would hold the step's new weights."""
    trainer = fake_trainer()
    train_step(trainer)
    reports: list[dict[str, Any]] = []
    tier = MemoryTier(
        tmp_path / "mem",
        1,
        job="j",
        fingerprint={},
        report=lambda event, **fields: reports.append(fields),
        max_overhead=0,
    )
    writer_threads: list[int] = []
    unsealed_folder = tier._unsealed_folder

    def slow_unsealed_folder(target: int, step: int) -> Path:
        writer_threads.append(threading.get_ident())
        time.sleep(0.3)  # the write is late: the step below comes first
        return unsealed_folder(target, step)

    tier._unsealed_folder = slow_unsealed_folder  # type: ignore[method-assign]
    weights = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad
    }
    tier.snapshot(trainer)
    assert tier.asynchronous and reports == []  # handed to the writer thread
    train_step(trainer)  # its optimizer step waits for the write, then reports it
    assert writer_threads and writer_threads[0] != threading.get_ident()
    assert [(r["step"], r["slot"]) for r in reports] == [(1, MEMORY_SLOTS[0])]
    assert reports[0]["stall_s"] >= 0.3  # the wait is the training thread's stall
    [(step, folder)] = slot_folders(tmp_path / "mem" / MEMORY_SLOTS[0])
    assert step == 1
    assert_same(read_snapshot(folder).weights, weights)
    changed = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(changed[n], weights[n]) for n in weights)
