"""Incremental staging: an unchanged frozen parameter is not copied again, and nothing stale is ever written.

Every way a tensor can change is tried on a frozen parameter of a component that opted in. The
ones torch's version counter sees (and new storage, shape or dtype) must be copied; the ones it
cannot see (``.data``, NumPy, DLPack, raw storage, another alias of the storage) are outside the
contract: ``verify_incremental`` must catch them, and a component that did not opt in (the
default) must stage them right.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointConfigError, CheckpointError, CheckpointManager, CheckpointSaveError, StateComponent
from async_ckpt.staging import StagingPool, frozen_identities


def _lora_like(seed: int = 0, fused: bool = False, foreach: bool | None = None):
    """A frozen base layer, a trainable head, and AdamW over the trainable parameters only."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused, foreach=foreach)
    _train_step(model, opt)
    return model, opt


def _train_step(model, opt) -> None:
    model(torch.randn(5, 16)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def _stage(pool: StagingPool, model, opts=()) -> dict[str, torch.Tensor]:
    return pool.stage("model", model.state_dict(), frozen=frozen_identities(model, opts))


def _assert_staged_equals(staged: dict[str, torch.Tensor], model) -> None:
    live = model.state_dict()
    assert staged.keys() == live.keys()
    for name, value in live.items():
        assert staged[name].shape == value.shape and staged[name].dtype == value.dtype, name
        assert torch.equal(staged[name], value.detach()), name


def _no_grad(fn):
    def run(model):
        with torch.no_grad():
            fn(model)

    return run


def _replace_parameter(model):
    model[0].weight = torch.nn.Parameter(torch.randn(32, 16), requires_grad=False)


def _resize(model):
    with torch.no_grad():
        model[0].bias.resize_(16)
        model[0].bias.fill_(3.0)


def _swap(model):
    torch.utils.swap_tensors(model[0].weight, torch.nn.Parameter(torch.randn(32, 16), requires_grad=False))


def _inference_mode(model):
    with torch.inference_mode():
        model[0].weight.add_(1.0)


def _to_dtype(model):
    model[0].to(torch.float64)


# Changes torch's version counter sees, or that give the tensor new storage or a new layout.
VISIBLE = {
    "no_grad add_": _no_grad(lambda m: m[0].weight.add_(1.0)),
    "copy_": _no_grad(lambda m: m[0].weight.copy_(torch.randn(32, 16))),
    "write through a view": _no_grad(lambda m: m[0].weight.view(-1).__setitem__(slice(0, 7), 5.0)),
    "write through an index": _no_grad(lambda m: m[0].weight.__setitem__((3, 4), -2.0)),
    "detach().mul_": lambda m: m[0].weight.detach().mul_(2.0),
    "foreach add_": _no_grad(lambda m: torch._foreach_add_([m[0].weight, m[0].bias], 1.0)),
    "init.normal_": lambda m: torch.nn.init.normal_(m[0].weight),
    "init.zeros_ on bias": lambda m: torch.nn.init.zeros_(m[0].bias),
    "inference_mode add_": _inference_mode,
    "load_state_dict": lambda m: m.load_state_dict({k: torch.randn_like(v) for k, v in m.state_dict().items()}),
    "load_state_dict(assign=True)": lambda m: m.load_state_dict({k: torch.randn_like(v) for k, v in m.state_dict().items()}, assign=True),
    "set_": _no_grad(lambda m: m[0].weight.set_(torch.randn(32, 16))),
    "resize_": _resize,
    "swap_tensors": _swap,
    "new Parameter": _replace_parameter,
    "module.to(float64)": _to_dtype,
}

# Writes the version counter cannot see: outside the incremental contract.
INVISIBLE = {
    ".data add_": lambda m: m[0].weight.data.add_(1.0),
    ".data copy_": lambda m: m[0].weight.data.copy_(torch.randn(32, 16)),
    "numpy view": lambda m: m[0].weight.detach().numpy().__setitem__((0, 0), 42.0),
    "DLPack": lambda m: torch.from_dlpack(m[0].weight.detach()).add_(1.0),
    "untyped_storage copy_": lambda m: m[0].weight.untyped_storage().copy_(torch.randn(32 * 16).untyped_storage()),
    "alias made with set_": lambda m: torch.empty(0).set_(m[0].weight.untyped_storage(), 0, (32 * 16,), (1,)).mul_(3.0),
}


def test_unchanged_frozen_parameters_are_skipped():
    model, opt = _lora_like()
    pool = StagingPool(pin_memory=False)
    first = _stage(pool, model, [opt])
    frozen_bytes = sum(p.numel() * p.element_size() for p in model[0].parameters())
    assert pool.stats.bytes_skipped == 0
    for _ in range(3):
        _train_step(model, opt)
        staged = _stage(pool, model, [opt])
        assert pool.stats.bytes_skipped == frozen_bytes
        assert pool.stats.bytes_copied == sum(p.numel() * p.element_size() for p in model[2].parameters())
        _assert_staged_equals(staged, model)
        assert staged["0.weight"].data_ptr() == first["0.weight"].data_ptr()


def test_without_frozen_argument_everything_is_copied():
    model, opt = _lora_like()
    pool = StagingPool(pin_memory=False)
    pool.stage("model", model.state_dict())
    pool.stage("model", model.state_dict())
    assert pool.stats.bytes_skipped == 0


@pytest.mark.parametrize("change", sorted(VISIBLE))
def test_visible_change_of_a_frozen_parameter_is_copied(change):
    model, opt = _lora_like()
    pool = StagingPool(pin_memory=False, verify_incremental=True)
    _stage(pool, model, [opt])
    VISIBLE[change](model)
    _assert_staged_equals(_stage(pool, model, [opt]), model)
    _assert_staged_equals(_stage(pool, model, [opt]), model)  # and the record after it is right too


@pytest.mark.parametrize("change", sorted(INVISIBLE))
def test_invisible_change_is_caught_by_verify(change):
    model, opt = _lora_like()
    pool = StagingPool(pin_memory=False, verify_incremental=True)
    _stage(pool, model, [opt])
    INVISIBLE[change](model)
    with pytest.raises(CheckpointError, match="changed without bumping its version counter"):
        _stage(pool, model, [opt])


@pytest.mark.parametrize("change", sorted(INVISIBLE) + sorted(VISIBLE))
def test_default_staging_is_never_stale(change):
    """Safe by default: without opting in, every change of every kind reaches the copy."""
    model, opt = _lora_like()
    pool = StagingPool(pin_memory=False)
    pool.stage("model", model.state_dict())
    {**INVISIBLE, **VISIBLE}[change](model)
    _assert_staged_equals(pool.stage("model", model.state_dict()), model)


@pytest.mark.parametrize("kind", ["sgd", "adamw", "adamw-foreach", "adamw-fused"])
def test_trainable_parameters_are_always_copied(kind):
    """Fused optimizers do not bump version counters: trainable parameters are never skipped."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    params = list(model.parameters())
    opt = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-2, foreach=False),
        "adamw-foreach": lambda: torch.optim.AdamW(params, lr=1e-2, foreach=True),
        "adamw-fused": lambda: torch.optim.AdamW(params, lr=1e-2, fused=True),
    }[kind]()
    pool = StagingPool(pin_memory=False, verify_incremental=True)
    _train_step(model, opt)
    _stage(pool, model, [opt])
    _train_step(model, opt)
    staged = _stage(pool, model, [opt])
    assert pool.stats.bytes_skipped == 0
    _assert_staged_equals(staged, model)


@pytest.mark.parametrize("fused", [False, True])
def test_frozen_parameter_held_by_an_optimizer_is_copied(fused):
    """An optimizer built over every parameter may update a frozen one once it is unfrozen."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    pool = StagingPool(pin_memory=False)
    _stage(pool, model, [opt])
    assert pool.stats.bytes_skipped == 0
    model[0].weight.requires_grad_(True)  # gradual unfreezing, then frozen again before the save
    _train_step(model, opt)
    model[0].weight.requires_grad_(False)
    _assert_staged_equals(_stage(pool, model, [opt]), model)


def test_unfrozen_parameter_added_to_the_optimizer_is_copied():
    model, opt = _lora_like(fused=True)
    pool = StagingPool(pin_memory=False)
    _stage(pool, model, [opt])
    model[0].weight.requires_grad_(True)
    opt.add_param_group({"params": [model[0].weight]})
    _train_step(model, opt)  # fused: the weight's version counter does not move
    _assert_staged_equals(_stage(pool, model, [opt]), model)


def test_optimizer_load_state_dict_and_step_reach_the_copy():
    model, opt = _lora_like(foreach=True)
    pool = StagingPool(pin_memory=False)
    pool.stage("optimizer", opt.state_dict(), frozen=frozen_identities(opt, [opt]))
    saved = opt.state_dict()
    _train_step(model, opt)
    opt.load_state_dict(saved)
    staged = pool.stage("optimizer", opt.state_dict(), frozen=frozen_identities(opt, [opt]))
    assert pool.stats.bytes_skipped == 0  # an optimizer is no module: nothing of it is frozen
    for index, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(staged["state"][index][name], value), (index, name)


def test_batchnorm_running_stats_are_copied():
    """BatchNorm updates its running statistics without bumping their version counter."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    model.requires_grad_(False)  # everything frozen, but the statistics are buffers, not parameters
    pool = StagingPool(pin_memory=False, verify_incremental=True)
    _stage(pool, model)
    model.train()(torch.randn(16, 4))
    _assert_staged_equals(_stage(pool, model), model)


def test_tied_frozen_weights_skip_once_and_stay_tied():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head}).requires_grad_(False)
    pool = StagingPool(pin_memory=False)
    _stage(pool, model)
    staged = _stage(pool, model)
    assert staged["emb.weight"] is staged["head.weight"]
    assert pool.stats.bytes_copied == 0 and pool.stats.bytes_skipped == 10 * 4 * 4
    with torch.no_grad():
        head.weight.mul_(2)
    staged = _stage(pool, model)
    assert torch.equal(staged["emb.weight"], emb.weight) and staged["emb.weight"] is staged["head.weight"]


def test_failed_copy_is_never_trusted(monkeypatch):
    model, opt = _lora_like()
    pool = StagingPool(pin_memory=False)
    _stage(pool, model, [opt])
    with torch.no_grad():
        model[0].weight.add_(1.0)
    plan = pool.plan("model", model.state_dict(), frozen=frozen_identities(model, [opt]))
    real_copy = torch.Tensor.copy_
    calls = []

    def failing_copy(self, src, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            real_copy(self[: self.shape[0] // 2], src[: src.shape[0] // 2])
            raise RuntimeError("copy interrupted")
        return real_copy(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(RuntimeError):
        plan.run()
    monkeypatch.undo()
    _assert_staged_equals(_stage(pool, model, [opt]), model)


def test_inference_tensors_are_never_skipped():
    with torch.inference_mode():
        model = torch.nn.Linear(4, 4).requires_grad_(False)
    pool = StagingPool(pin_memory=False)
    _stage(pool, model)
    with torch.inference_mode():
        model.weight.add_(1.0)
    _assert_staged_equals(_stage(pool, model), model)
    assert pool.stats.bytes_skipped == 0


# ------------------------------------------------------------------------------------ manager


def _components(model, opt):
    return [StateComponent("model", model, required=True), StateComponent("optimizer", opt)]


def test_manager_incremental_round_trip_bitwise(tmp_path):
    model, opt = _lora_like()
    with CheckpointManager(tmp_path, _components(model, opt), incremental=["model"], verify_incremental=True) as mgr:
        for step in range(1, 4):
            _train_step(model, opt)
            if step == 2:
                with torch.no_grad():
                    model[0].weight.mul_(0.5)  # a visible change of a frozen parameter between saves
            skipped = mgr._pool.stats.total_skipped
            mgr.save(step).wait()
            expected_skip = {1: 0, 2: 32 * 4, 3: 32 * 16 * 4 + 32 * 4}[step]  # step 2: the bias only
            assert mgr._pool.stats.total_skipped - skipped == expected_skip
        expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, fresh_opt = _lora_like(seed=1)
    with CheckpointManager(tmp_path, _components(fresh, fresh_opt)) as mgr:
        assert mgr.load().step == 3
    for name, value in expected.items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_manager_verify_incremental_fails_the_save(tmp_path):
    model, opt = _lora_like()
    with CheckpointManager(tmp_path, _components(model, opt), incremental=["model"], verify_incremental=True) as mgr:
        mgr.save(1).wait()
        model[0].weight.data.add_(1.0)
        with pytest.raises(CheckpointSaveError, match="version counter"):
            mgr.save(2).wait()
        assert mgr.latest().name == "checkpoint-1"


def test_manager_default_is_not_incremental(tmp_path):
    model, opt = _lora_like()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        mgr.save(1).wait()
        model[0].weight.data.add_(1.0)  # invisible to the version counter: still saved
        mgr.save(2).wait()
        assert mgr._pool.stats.bytes_skipped == 0
    fresh, fresh_opt = _lora_like(seed=1)
    with CheckpointManager(tmp_path, _components(fresh, fresh_opt)) as mgr:
        mgr.load()
    assert torch.equal(fresh[0].weight, model[0].weight)


@pytest.mark.parametrize(
    "incremental, match",
    [("model", "list of component keys"), (["nope"], "not one of"), (["optimizer"], "not a torch.nn.Module")],
)
def test_manager_refuses_bad_incremental(tmp_path, incremental, match):
    model, opt = _lora_like()
    with pytest.raises(CheckpointConfigError, match=match):
        CheckpointManager(tmp_path, _components(model, opt), incremental=incremental)


def test_numpy_of_frozen_parameter_is_a_real_alias():
    """Guard for the INVISIBLE table: the NumPy write above really changes the parameter."""
    model, _ = _lora_like()
    before = model[0].weight.clone()
    INVISIBLE["numpy view"](model)
    assert not torch.equal(before, model[0].weight)
    assert isinstance(model[0].weight.detach().numpy(), np.ndarray)
