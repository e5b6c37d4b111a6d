"""async_ckpt.staging: buffers allocated once and reused, point-in-time copies, ties kept."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from async_ckpt.staging import StagingPool


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, opt)
    return model, opt


def _train_step(model, opt) -> None:
    model(torch.randn(5, 8)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def _tensors(value, path=""):
    """Every (path, tensor) of a nested state."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{path}.{i}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().contiguous().reshape(-1).view(torch.uint8) if t.numel() and t.dim() else t.detach().clone()


def _assert_bitwise_equal(a, b) -> None:
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    assert ta.keys() == tb.keys()
    for path in ta:
        assert ta[path].dtype == tb[path].dtype and ta[path].shape == tb[path].shape, path
        assert torch.equal(_bits(ta[path]), _bits(tb[path])), path


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


def test_no_new_buffer_after_first_save():
    model, opt = _model_and_optimizer()
    pool = StagingPool(pin_memory=False)
    pool.stage("model", model.state_dict())
    pool.stage("optimizer", opt.state_dict())
    first = pool.stats.allocations
    n_tensors = len(list(_tensors(model.state_dict()))) + len(list(_tensors(opt.state_dict())))
    assert first == n_tensors
    nbytes = pool.nbytes
    assert pool.stats.bytes_allocated == nbytes
    for _ in range(5):
        _train_step(model, opt)
        staged_model = pool.stage("model", model.state_dict())
        staged_opt = pool.stage("optimizer", opt.state_dict())
        assert pool.stats.allocations == first
        assert pool.nbytes == nbytes
        _assert_bitwise_equal(staged_model, model.state_dict())
        _assert_bitwise_equal(staged_opt, opt.state_dict())
    assert pool.stats.bytes_copied == sum(t.numel() * t.element_size() for _, t in _tensors(opt.state_dict()))


def test_buffers_are_reused_not_replaced():
    model, _ = _model_and_optimizer()
    pool = StagingPool(pin_memory=False)
    a = pool.stage("model", model.state_dict())
    b = pool.stage("model", model.state_dict())
    assert all(a[k].data_ptr() == b[k].data_ptr() for k in a)


def test_buffer_reallocated_when_shape_or_dtype_changes():
    pool = StagingPool(pin_memory=False)
    pool.stage("c", {"w": torch.ones(3, 4), "b": torch.ones(4)})
    assert pool.stats.allocations == 2
    staged = pool.stage("c", {"w": torch.ones(5, 4), "b": torch.ones(4)})
    assert pool.stats.allocations == 3
    assert staged["w"].shape == (5, 4)
    pool.stage("c", {"w": torch.ones(5, 4, dtype=torch.float64), "b": torch.ones(4)})
    assert pool.stats.allocations == 4
    pool.stage("c", {"w": torch.ones(5, 4, dtype=torch.float64), "b": torch.ones(4)})
    assert pool.stats.allocations == 4
    assert pool.nbytes == 5 * 4 * 8 + 4 * 4  # replaced buffers are dropped, not kept


def test_components_do_not_share_buffers():
    pool = StagingPool(pin_memory=False)
    a = pool.stage("a", {"w": torch.ones(3)})
    b = pool.stage("b", {"w": torch.zeros(3)})
    assert a["w"].data_ptr() != b["w"].data_ptr()
    assert torch.equal(a["w"], torch.ones(3))


def test_point_in_time_copy():
    model, opt = _model_and_optimizer()
    before_model, before_opt = _clone(model.state_dict()), _clone(opt.state_dict())
    pool = StagingPool(pin_memory=False)
    staged_model = pool.stage("model", model.state_dict())
    staged_opt = pool.stage("optimizer", opt.state_dict())
    # in place, right after the snapshot: parameters, optimizer moments, step counters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    _train_step(model, opt)
    for state in opt.state.values():
        state["exp_avg"].mul_(-3)
        state["step"].add_(100)
    opt.param_groups[0]["lr"] = 123.0
    _assert_bitwise_equal(staged_model, before_model)
    _assert_bitwise_equal(staged_opt, before_opt)
    assert staged_opt["param_groups"][0]["lr"] == 1e-2
    with pytest.raises(AssertionError):
        _assert_bitwise_equal(staged_model, model.state_dict())


def test_tied_weights_share_one_buffer():
    emb = torch.nn.Embedding(10, 4)
    out = torch.nn.Linear(4, 10, bias=False)
    out.weight = emb.weight
    state = {"emb.weight": emb.weight, "out.weight": out.weight, "other": torch.ones(2)}
    pool = StagingPool(pin_memory=False)
    staged = pool.stage("model", state)
    assert staged["emb.weight"] is staged["out.weight"]
    assert staged["emb.weight"].data_ptr() != emb.weight.data_ptr()
    assert pool.stats.allocations == 2
    assert torch.equal(staged["out.weight"], emb.weight.detach())


def test_non_contiguous_tensors_copied_right():
    base = torch.arange(24.0).reshape(4, 6)
    state = {"t": base.t(), "slice": base[:, ::2], "expanded": torch.ones(3, 1).expand(3, 5), "off": base[1]}
    expected = _clone(state)
    staged = StagingPool(pin_memory=False).stage("c", state)
    for k, v in staged.items():
        assert v.is_contiguous()
        assert torch.equal(v, expected[k]), k
    base.zero_()
    assert torch.equal(staged["t"], expected["t"])


def test_non_tensor_values_deep_copied():
    items = [1, [2, 3], {"x": "y"}]
    state = OrderedDict(
        config={"items": items, "name": "run"},
        numbers=(1, 2.5, None),
        t=torch.ones(2),
        obj_list=[torch.zeros(1), "tag"],
    )
    staged = StagingPool(pin_memory=False).stage("c", state)
    items.append(4)
    items[1].append(99)
    items[2]["x"] = "changed"
    state["config"]["name"] = "other"
    state["obj_list"].append("more")
    assert staged["config"] == {"items": [1, [2, 3], {"x": "y"}], "name": "run"}
    assert staged["numbers"] == (1, 2.5, None)
    assert len(staged["obj_list"]) == 2
    assert type(staged) is OrderedDict


def test_zero_dim_and_empty_tensors():
    state = {"step": torch.tensor(5.0), "empty": torch.zeros(0), "empty2": torch.zeros(0)}
    pool = StagingPool(pin_memory=False)
    staged = pool.stage("c", state)
    state["step"].add_(1)
    assert staged["step"].item() == 5.0 and staged["step"].dim() == 0
    assert staged["empty"].shape == (0,) and staged["empty2"].shape == (0,)
    pool.stage("c", state)
    assert pool.stats.allocations == 3


def test_reserve_preallocates():
    model, opt = _model_and_optimizer()
    pool = StagingPool(pin_memory=False)
    pool.reserve("model", model.state_dict())
    pool.reserve("optimizer", opt.state_dict())
    reserved = pool.stats.allocations
    assert reserved > 0 and pool.stats.bytes_copied == 0
    staged = pool.stage("model", model.state_dict())
    pool.stage("optimizer", opt.state_dict())
    assert pool.stats.allocations == reserved
    _assert_bitwise_equal(staged, model.state_dict())


def test_reserve_allocates_tied_weights_once():
    emb = torch.nn.Embedding(100, 8)
    state = {"emb.weight": emb.weight, "out.weight": emb.weight}
    staged_only = StagingPool(pin_memory=False)
    staged_only.stage("model", state)
    reserved = StagingPool(pin_memory=False)
    reserved.reserve("model", state)
    reserved.stage("model", state)
    assert reserved.nbytes == staged_only.nbytes
