"""All-or-nothing load (issue 14 item 7): a load that cannot complete leaves every live object as it was."""

from __future__ import annotations

import pytest
import torch

from async_ckpt import (
    CheckpointLoadError,
    CheckpointManager,
    StateComponent,
    rng_component,
)
from async_ckpt.applying import check_states


def _model(out: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, out))


def _trained(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.step()
    return opt, sched


def _bits(module_or_opt) -> dict:
    state = module_or_opt.state_dict()
    if "state" in state:
        return {f"{i}.{k}": v.clone() for i, s in state["state"].items() for k, v in s.items()} | {"groups": repr(state["param_groups"])}
    return {k: v.clone() for k, v in state.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


class Picky:
    """A Stateful whose load fails: a check that could not be made in advance."""

    def __init__(self) -> None:
        self.value = 1

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state) -> None:
        raise ValueError("this object refuses any state")


def _save(tmp_path, components) -> None:
    with CheckpointManager(tmp_path, components, async_save=False) as mgr:
        mgr.save(1)


def test_changed_architecture_is_refused_before_anything_is_touched(tmp_path):
    model = _model(out=4)
    opt, _ = _trained(model)
    _save(tmp_path, [StateComponent("model", model, required=True), StateComponent("optimizer", opt)])
    other = _model(out=5, seed=1)
    other_opt, _ = _trained(other)
    before_model, before_opt = _bits(other), _bits(other_opt)
    with CheckpointManager(tmp_path, [StateComponent("model", other, required=True), StateComponent("optimizer", other_opt)]) as mgr:
        with pytest.raises(CheckpointLoadError) as info:
            mgr.load()
    text = str(info.value)
    assert "'2.weight' is [4, 8] in the checkpoint, [5, 8] in the model" in text
    assert "What to do" in text and "strict=False" in text and "output_dir" in text
    assert _same(_bits(other), before_model) and _same(_bits(other_opt), before_opt)


def test_a_model_that_fits_is_not_overwritten_when_the_optimizer_does_not(tmp_path):
    model = _model()
    opt, _ = _trained(model)
    _save(tmp_path, [StateComponent("model", model, required=True), StateComponent("optimizer", opt)])
    fresh = _model(seed=2)
    split = torch.optim.AdamW([{"params": list(fresh.parameters())[:2]}, {"params": list(fresh.parameters())[2:]}])
    before = _bits(fresh)
    with CheckpointManager(tmp_path, [StateComponent("model", fresh, required=True), StateComponent("optimizer", split)]) as mgr:
        with pytest.raises(CheckpointLoadError, match=r"1 parameter group\(s\) of sizes \[4\], this one has 2 of sizes \[2, 2\]"):
            mgr.load()
    assert _same(_bits(fresh), before)


def test_a_failing_component_rolls_back_what_was_applied(tmp_path):
    model = _model()
    opt, sched = _trained(model)
    comps = [StateComponent("model", model, required=True), StateComponent("optimizer", opt), StateComponent("scheduler", sched),
             rng_component(), StateComponent("picky", Picky())]
    _save(tmp_path, comps)
    fresh = _model(seed=3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    torch.manual_seed(99)
    rng_before = torch.get_rng_state()
    before = (_bits(fresh), _bits(fresh_opt), dict(fresh_sched.state_dict()))
    comps = [StateComponent("model", fresh, required=True), StateComponent("optimizer", fresh_opt),
             StateComponent("scheduler", fresh_sched), rng_component(), StateComponent("picky", Picky())]
    with CheckpointManager(tmp_path, comps) as mgr:
        with pytest.raises(CheckpointLoadError) as info:
            mgr.load()
    assert "component 'picky'] load_state_dict failed: ValueError: this object refuses any state" in str(info.value)
    assert "Nothing was loaded" in str(info.value)
    assert _same(_bits(fresh), before[0]) and _same(_bits(fresh_opt), before[1])
    assert fresh_sched.state_dict() == before[2] and fresh_opt.param_groups[0]["lr"] == 1e-2
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize("num_workers", [0])
def test_a_raw_stateful_dataloader_is_left_as_it_was(tmp_path, num_workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(list(range(10)), batch_size=2, num_workers=num_workers)
    it = iter(loader)
    next(it)
    _save(tmp_path, [StateComponent("data", loader), StateComponent("picky", Picky())])
    fresh = StatefulDataLoader(list(range(10)), batch_size=2, num_workers=num_workers)
    fresh_it = iter(fresh)
    assert next(fresh_it).tolist() == [0, 1]
    with CheckpointManager(tmp_path, [StateComponent("data", fresh), StateComponent("picky", Picky())]) as mgr:
        with pytest.raises(CheckpointLoadError):
            mgr.load()
    assert fresh._iterator is fresh_it and next(iter(fresh)).tolist() == [0, 1]  # a new epoch, as before the load


def test_missing_unexpected_and_lossy_dtypes_are_listed():
    live = torch.nn.Linear(2, 2)
    saved = {"weight": torch.zeros(2, 2, dtype=torch.int64), "extra": torch.zeros(1)}
    problems = " ".join(check_states({"model": saved}, [StateComponent("model", live)]))
    assert "'bias'" in problems and "'extra'" in problems and "torch.int64 in the checkpoint, torch.float32" in problems


def test_a_float_precision_change_is_allowed_as_torch_allows_it(tmp_path):
    model = _model()
    _save(tmp_path, [StateComponent("model", model.to(torch.bfloat16), required=True)])
    fresh = _model(seed=5)
    with CheckpointManager(tmp_path, [StateComponent("model", fresh, required=True)]) as mgr:
        assert mgr.load().loaded == ["model"]
    assert torch.equal(fresh[0].weight, model[0].weight.float())


def test_a_load_that_fits_restores_every_component_in_order(tmp_path):
    model = _model()
    opt, sched = _trained(model)
    _save(tmp_path, [StateComponent("model", model, required=True), StateComponent("optimizer", opt), StateComponent("scheduler", sched)])
    fresh = _model(seed=4)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    comps = [StateComponent("model", fresh, required=True), StateComponent("optimizer", fresh_opt), StateComponent("scheduler", fresh_sched)]
    with CheckpointManager(tmp_path, comps) as mgr:
        assert mgr.load().loaded == ["model", "optimizer", "scheduler"]
    assert _same(_bits(fresh), _bits(model)) and _same(_bits(fresh_opt), _bits(opt))
    assert fresh_sched.state_dict() == sched.state_dict()
