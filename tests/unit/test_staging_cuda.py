"""Staging from CUDA: pinned buffers, the side stream, incremental and overlap mode (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from async_ckpt import CheckpointManager, StateComponent
from async_ckpt.staging import StagingPool, frozen_identities

pytestmark = pytest.mark.gpu  # tests/conftest.py skips these without CUDA


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 8)).cuda()
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt


def _step(model, opt):
    model(torch.randn(4, 1024, device="cuda")).sum().backward()
    opt.step()
    opt.zero_grad()


def test_pinned_buffers_hold_the_point_in_time_copy():
    model, opt = _model()
    _step(model, opt)
    pool = StagingPool()
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    staged = pool.stage("model", model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # queued on the compute stream right after the copy
    torch.cuda.synchronize()
    for name, value in expected.items():
        assert staged[name].is_pinned() and torch.equal(staged[name], value), name


def test_side_stream_waits_for_the_kernels_that_produce_the_state():
    """The copy runs on a side stream: it must start only after the training stream wrote the values.

    ``torch.cuda._sleep`` keeps the training stream busy before the ``fill_`` that produces the
    tensor; a side stream that does not wait for the training stream's event copies the zeros.
    """
    source = torch.zeros(16 << 20, device="cuda")  # 64 MiB
    pool = StagingPool()
    pool.stage("state", {"x": source})  # buffers allocated; the next stage() reuses them
    torch.cuda._sleep(200_000_000)  # about 0.1 s of spinning on the training stream
    source.fill_(7.0)
    staged = pool.stage("state", {"x": source})
    assert staged["x"].is_pinned()
    assert torch.equal(staged["x"], torch.full((16 << 20,), 7.0)), "the copy did not wait for the training stream"


def test_incremental_on_cuda_skips_frozen_and_copies_changes():
    model, opt = _model()
    _step(model, opt)
    pool = StagingPool(verify_incremental=True)
    pool.stage("model", model.state_dict(), frozen=frozen_identities(model, [opt]))
    _step(model, opt)
    staged = pool.stage("model", model.state_dict(), frozen=frozen_identities(model, [opt]))
    assert pool.stats.bytes_skipped == (1024 * 1024 + 1024) * 4
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    staged = pool.stage("model", model.state_dict(), frozen=frozen_identities(model, [opt]))
    for name, value in model.state_dict().items():
        assert torch.equal(staged[name], value.cpu()), name


def test_overlap_mode_on_cuda(tmp_path):
    model, opt = _model()
    _step(model, opt)
    with CheckpointManager(tmp_path, [StateComponent("model", model, required=True), StateComponent("optimizer", opt)]) as mgr:
        expected = {k: v.cpu() for k, v in model.state_dict().items()}
        mgr.save(1, overlap=True)
        model(torch.randn(4, 1024, device="cuda")).sum().backward()
        mgr.wait_snapshot()
        opt.step()
        mgr.wait()
    fresh, fresh_opt = _model()
    with CheckpointManager(tmp_path, [StateComponent("model", fresh, required=True), StateComponent("optimizer", fresh_opt)]) as mgr:
        mgr.load()
    for name, value in expected.items():
        assert torch.equal(fresh.state_dict()[name].cpu(), value), name
