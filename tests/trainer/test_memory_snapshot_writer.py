"""What a memory snapshot holds (issue 18), read back as the resume reads it.

The writer keeps a plan (where each tensor goes, the optimizer state's pickled
skeleton) from one snapshot to the next and checks it by the tensors'
identities instead of walking `optimizer.state_dict()` every step. What must
hold: a snapshot written with a kept plan is the optimizer's `state_dict()`,
the trainable weights and HF's loss accumulator of its step (the param groups'
lr of now); a state value that is not a tensor (changed in place, invisible to
the identities) is taken anew every time. Real torch optimizers, schedulers
and files; the trainer is the few attributes the writer reads.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import TrainerState

from ftsup.trainer.memory_snapshot import SnapshotWriter, read_snapshot


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


def write(writer: SnapshotWriter, trainer: Any, folder: Path) -> None:
    folder.mkdir(parents=True)
    writer.write(trainer, folder, None, {"step": trainer.state.global_step}, lambda point: None)


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


def test_a_snapshot_with_a_kept_plan_is_the_state_of_its_step(tmp_path: Path) -> None:
    trainer = fake_trainer()
    writer = SnapshotWriter()
    plans = []
    for step in (1, 2, 3):  # the second and third snapshots use the plan the first made
        train_step(trainer)
        expected_optimizer = clone_state(trainer.optimizer.state_dict())
        expected_weights = {
            name: p.detach().clone()
            for name, p in trainer.model.named_parameters()
            if p.requires_grad
        }
        expected_loss = trainer._tr_loss.clone()
        folder = tmp_path / f"checkpoint-{step}"
        write(writer, trainer, folder)
        plans.append(writer._plan)
        contents = read_snapshot(folder)
        assert contents.state["step"] == step
        assert_same(contents.optimizer, expected_optimizer)  # param groups: the lr of now
        assert_same(contents.weights, expected_weights)
        assert contents.loss_window is not None
        assert torch.equal(contents.loss_window, expected_loss)
    assert expected_optimizer["param_groups"][0]["lr"] != 1e-2  # the scheduler moved it
    assert plans[0] is not None and plans[1] is plans[2]  # the first step created the state


def test_a_state_value_that_is_not_a_tensor_is_taken_anew_each_time(tmp_path: Path) -> None:
    trainer = fake_trainer(CountingSGD)
    writer = SnapshotWriter()
    for step in (1, 2, 3):
        train_step(trainer)
        folder = tmp_path / f"checkpoint-{step}"
        write(writer, trainer, folder)
        state = list(read_snapshot(folder).optimizer["state"].values())
        assert [per["seen"] for per in state] == [list(range(1, step + 1))] * len(state)
