"""Overlap mode: save(overlap=True) copies while forward/backward compute; wait_snapshot() before the step.

Point-in-time must hold: what changes after ``wait_snapshot()`` never reaches the checkpoint,
and a version-visible change before it fails the save instead of committing a torn state.
"""

from __future__ import annotations

import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointSaveError, StateComponent
from async_ckpt.staging import SMALL_TENSOR_BYTES


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    # 512 x 1024 fp32 = 2 MiB: large enough to be copied on the helper thread
    model = torch.nn.Sequential(torch.nn.Linear(1024, 512), torch.nn.BatchNorm1d(512), torch.nn.Linear(512, 4))
    assert model[0].weight.numel() * 4 >= SMALL_TENSOR_BYTES
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _forward_backward(model)
    opt.step()
    opt.zero_grad()
    return model, opt


def _forward_backward(model) -> None:
    model(torch.randn(8, 1024)).pow(2).sum().backward()


def _components(model, opt):
    return [StateComponent("model", model, required=True), StateComponent("optimizer", opt)]


def _snapshot(model, opt):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()
    }


def _load(path, frozen: bool = False):
    model, opt = _model_and_optimizer(seed=7)
    if frozen:
        model[0].requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with CheckpointManager(path, _components(model, opt)) as mgr:
        result = mgr.load()
    return result, model, opt


def _assert_equal(model, opt, expected) -> None:
    model_state, opt_state = expected
    for name, value in model_state.items():
        assert torch.equal(model.state_dict()[name], value), name
    for index, state in opt_state.items():
        for name, value in state.items():
            assert torch.equal(opt.state_dict()["state"][index][name], value), (index, name)


def test_changes_after_wait_snapshot_do_not_reach_the_checkpoint(tmp_path):
    model, opt = _model_and_optimizer()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        expected = _snapshot(model, opt)
        handle = mgr.save(1, overlap=True)
        _forward_backward(model)  # forward updates BatchNorm statistics: copied before save() returned
        mgr.wait_snapshot()
        opt.step()
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[0].weight.data.mul_(3.0)  # even writes the version counter cannot see
        assert handle.wait() is not None
        assert "snapshot_wait_s" in handle.timings
    result, loaded, loaded_opt = _load(tmp_path)
    assert result.step == 1
    _assert_equal(loaded, loaded_opt, expected)


def test_visible_change_before_wait_snapshot_fails_the_save(tmp_path):
    model, opt = _model_and_optimizer()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        mgr.save(1).wait()
        handle = mgr.save(2, overlap=True)
        _forward_backward(model)
        opt.step()  # too early: the copy may be running
        mgr.wait_snapshot()
        with pytest.raises(CheckpointSaveError, match="changed while overlap mode was copying"):
            handle.wait()
        assert mgr.latest().name == "checkpoint-1"
        expected = _snapshot(model, opt)
        mgr.save(3, overlap=True)
        mgr.wait_snapshot()
        mgr.wait()
    result, loaded, loaded_opt = _load(tmp_path)
    assert result.step == 3
    _assert_equal(loaded, loaded_opt, expected)


def test_next_save_wait_and_close_confirm_a_pending_snapshot(tmp_path):
    model, opt = _model_and_optimizer()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        first = mgr.save(1, overlap=True)
        second = mgr.save(2, overlap=True)  # confirms the first before staging again
        assert first.wait() is not None
        assert mgr.wait().name == "checkpoint-2"
        third = mgr.save(3, overlap=True)
    assert third.wait().name == "checkpoint-3" and second.done()


def test_unconfirmed_snapshot_times_out_instead_of_committing(tmp_path):
    model, opt = _model_and_optimizer()
    mgr = CheckpointManager(tmp_path, _components(model, opt), timeout_s=0.5)
    handle = mgr.save(1, overlap=True)
    with pytest.raises(CheckpointSaveError, match="never confirmed by wait_snapshot"):
        handle.wait(30)
    assert mgr.latest() is None
    mgr.close()


def test_overlap_with_sync_saves_is_a_plain_save(tmp_path):
    model, opt = _model_and_optimizer()
    expected = _snapshot(model, opt)
    with CheckpointManager(tmp_path, _components(model, opt), async_save=False) as mgr:
        handle = mgr.save(1, overlap=True)
        assert handle.done()
        with torch.no_grad():
            model[0].weight.add_(1.0)
    _, loaded, loaded_opt = _load(tmp_path)
    _assert_equal(loaded, loaded_opt, expected)


def test_overlap_and_incremental_together(tmp_path):
    model, opt = _model_and_optimizer()
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _forward_backward(model)
    opt.step()
    with CheckpointManager(tmp_path, _components(model, opt), incremental=["model"], verify_incremental=True) as mgr:
        for step in range(1, 4):
            expected = _snapshot(model, opt)
            mgr.save(step, overlap=True)
            _forward_backward(model)
            mgr.wait_snapshot()
            opt.step()
            opt.zero_grad()
        mgr.wait()
    result, loaded, loaded_opt = _load(tmp_path, frozen=True)
    assert result.step == 3
    _assert_equal(loaded, loaded_opt, expected)
