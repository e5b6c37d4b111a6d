"""Each named LR schedule: the LR curve of a real optimizer against torch's own schedulers or HF's formula."""

from __future__ import annotations

import math

import pytest
import torch

from async_ckpt.trainer import TrainingArguments
from async_ckpt.trainer.schedulers import build_scheduler

TOTAL, LR = 20, 0.1


def _curve(scheduler_type: str, warmup: int = 0, **extra) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    args = TrainingArguments(lr_scheduler_type=scheduler_type, warmup_steps=warmup, **extra)
    sched = build_scheduler(opt, args, TOTAL)
    out = []
    for _ in range(TOTAL):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _torch_curve(make) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = make(opt)
    out = []
    for _ in range(TOTAL):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_is_torchs_constant_and_ignores_warmup() -> None:
    assert _curve("constant", warmup=5) == pytest.approx(_torch_curve(lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0)))


def test_linear_without_warmup_is_torchs_linear_lr() -> None:
    expected = _torch_curve(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=TOTAL))
    assert _curve("linear") == pytest.approx(expected, abs=1e-12)


def test_cosine_without_warmup_is_torchs_cosine_annealing() -> None:
    expected = _torch_curve(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL, eta_min=0.0))
    assert _curve("cosine") == pytest.approx(expected, abs=1e-12)


def test_cosine_with_restarts_is_torchs_warm_restarts() -> None:
    expected = _torch_curve(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=TOTAL // 2))
    assert _curve("cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2}) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine"])
def test_warmup_then_decay_follows_hfs_formula(name: str) -> None:
    warmup = 4
    curve = _curve(name, warmup=warmup)
    for step, lr in enumerate(curve):
        if step < warmup:
            factor = step / warmup
        elif name == "constant_with_warmup":
            factor = 1.0
        elif name == "linear":
            factor = (TOTAL - step) / (TOTAL - warmup)
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (TOTAL - warmup)))
        assert lr == pytest.approx(LR * factor, abs=1e-12), (name, step)


def test_warmup_ratio_rounds_up_and_warmup_steps_wins() -> None:
    assert _curve("constant_with_warmup", warmup_ratio=0.12)[:4] == pytest.approx([0, LR / 3, 2 * LR / 3, LR])  # ceil(2.4) = 3
    assert _curve("constant_with_warmup", warmup=2, warmup_ratio=0.5)[:3] == pytest.approx([0, LR / 2, LR])


def test_bad_values_and_positional_output_dir() -> None:
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        TrainingArguments(lr_scheduler_type="cosine_annealing")
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainingArguments(warmup_ratio=1.5)
    assert str(TrainingArguments("runs/x").output_dir) == "runs/x"
