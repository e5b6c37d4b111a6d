"""Shared pieces of the trainer tests, and a training process for the SIGKILL test.

Fixtures: ``TinyModel`` (a 2-layer MLP with dropout whose forward returns ``{"loss": ...}``),
``RegressionData`` (40 fixed samples as dicts, so 10 batches of 4 per epoch), ``state_of``
(clones of every parameter and optimizer tensor, for bitwise comparison) and ``StopAt`` (a
mixin that ends training after a given step, as a stopped job would).

``python -m tests.distributed.trainer_child OUT MAX_STEPS``: trains a model of a few MiB with
a save every step, logging to stdout (the trainer's "resumed from ..." summary included); prints
``step <n>`` after every step and ``done <step>`` at the end.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from async_ckpt.trainer import Trainer, TrainingArguments


class TinyModel(nn.Module):
    """A 2-layer MLP with dropout; ``forward(x, labels)`` returns ``{"loss", "logits"}``."""

    def __init__(self, width: int = 16, features: int = 8, p: float = 0.2) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Dropout(p), nn.Linear(width, width), nn.ReLU(), nn.Dropout(p), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.layers(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(logits, labels), "logits": logits}


class RegressionData(Dataset):
    """``n`` fixed samples ``{"x": float[features], "labels": float}``, the same in every process."""

    def __init__(self, n: int = 40, features: int = 8) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, features, generator=g)
        self.y = self.x.sum(-1) * 0.1 + torch.randn(n, generator=g) * 0.01

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def new_model(seed: int = 0, **kwargs: Any) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(**kwargs)


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Clones of every parameter and every optimizer state tensor, by name."""
    out = {f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for pid, slots in optimizer.state_dict()["state"].items():
        for name, value in slots.items():
            out[f"optim.{pid}.{name}"] = value.clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ after resume: {differ}"


class StopAt:
    """Mixin: ``stop()`` once ``stop_at`` steps are done (a job that was stopped there)."""

    stop_at: int | None = None
    steps_run = 0

    def training_step(self, batch: Any) -> torch.Tensor:
        loss = super().training_step(batch)  # type: ignore[misc]
        self.steps_run += 1
        if self.stop_at is not None and self.state.global_step + 1 == self.stop_at:  # type: ignore[attr-defined]
            self.stop()  # type: ignore[attr-defined]
        return loss


class StopTrainer(StopAt, Trainer):
    pass


def main(out: str, max_steps: int) -> None:
    """The SIGKILL test's child: ~6 MiB of model, ~12 MiB of AdamW state, a save every step."""
    torch.set_num_threads(1)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    model = new_model(features=256, width=1024, p=0.1)
    args = TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=4, save_steps=1, save_total_limit=3, logging_steps=0, save_timeout_s=60)

    class Child(Trainer):
        def training_step(self, batch: Any) -> torch.Tensor:
            loss = super().training_step(batch)
            print(f"step {self.state.global_step + 1}", flush=True)
            return loss

    output = Child(model=model, args=args, train_dataset=RegressionData(n=64, features=256)).train()
    print(f"done {output.global_step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
