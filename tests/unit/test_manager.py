"""async_ckpt.manager: CheckpointManager end to end in one process (world size 1, no process group).

Real files under tmp_path. A "gate" component holds the single I/O thread inside its first file
write (a callback on the ``mid_write`` fault point) until the test opens it, which makes in-flight saves deterministic without sleeping.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
import json
import logging
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from async_ckpt import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLoadError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointTimeoutError,
    StateComponent,
    faults,
    rng_component,
)
from async_ckpt.errors import CheckpointConfigError
from async_ckpt.layout import LOCK_NAME, MANIFEST_NAME, list_committed, list_leftovers, staging_dirname
from async_ckpt.manifest import check_files, read_manifest
from async_ckpt.storage import hash_file

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_faults():
    faults.disarm()
    yield
    faults.disarm()


# ------------------------------------------------------------------------------ helpers


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(13, 6)
        self.hidden = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 13, bias=False)
        self.out.weight = self.emb.weight  # tied


def _setup(seed: int = 0, steps: int = 2):
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _train_step(model, opt)
    return model, opt


def _train_step(model, opt) -> None:
    x = torch.randint(0, 13, (4, 3))
    logits = model.out(torch.relu(model.hidden(model.emb(x))))
    logits.pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _components(model, opt, *extra, rng: bool = True):
    comps = [StateComponent("model", model, required=True), StateComponent("optimizer", opt)]
    if rng:
        comps.append(rng_component())
    return comps + list(extra)


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


def _assert_same(a, b, path="") -> None:
    """Bitwise equality of nested states (tensors compared as bytes, the rest with ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)) if a.dim() else torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}.{i}")
    else:
        assert a == b, path


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME)  # the lock file stays: ownership.py


def _flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


class _Gate:
    """A fault-point callback that holds the first file write it sees until ``open`` is set."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self._used = False

    def __call__(self, point: str, rank: int) -> None:
        if self._used:
            return
        self._used = True
        self.entered.set()
        assert self.open.wait(30), "gate never opened"


class _GateComponent:
    """Put first in the component list with one I/O thread: its file is written first, and held."""

    def __init__(self) -> None:
        self.gate = _Gate()
        faults.arm("mid_write", self.gate)

    def state_dict(self):
        return {"g": 0}

    def load_state_dict(self, sd) -> None:
        pass


class _Flaky:
    """A component whose state_dict() fails while ``fail`` is set."""

    def __init__(self) -> None:
        self.fail = False
        self.value = 1

    def state_dict(self):
        if self.fail:
            raise RuntimeError("flaky state_dict exploded")
        return {"value": self.value}

    def load_state_dict(self, sd) -> None:
        self.value = sd["value"]


# ------------------------------------------------------------------------------ round trips


def test_save_load_round_trip_bitwise(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        expected_model, expected_opt = _clone(model.state_dict()), _clone(opt.state_dict())
        handle = mgr.save(10)
        assert handle.wait() == tmp_path / "checkpoint-10"
        after_rng = (torch.rand(4), random.random(), np.random.rand(3))
    assert _names(tmp_path / "checkpoint-10") == [MANIFEST_NAME, "model.safetensors", "optimizer_state.pt", "rng_state.pt"]

    fresh_model, fresh_opt = _setup(seed=99, steps=1)
    with CheckpointManager(tmp_path, _components(fresh_model, fresh_opt)) as mgr:
        result = mgr.load()
    assert result is not None and result.step == 10 and result.path == tmp_path / "checkpoint-10"
    assert result.loaded == ["model", "optimizer", "rng"] and result.skipped == []
    _assert_same(fresh_model.state_dict(), expected_model)
    _assert_same(fresh_opt.state_dict(), expected_opt)
    assert fresh_model.out.weight is fresh_model.emb.weight
    again = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(again[0], after_rng[0]) and again[1] == after_rng[1] and np.array_equal(again[2], after_rng[2])


def test_load_with_str_and_path(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        mgr.save(1).wait()
        mgr.save(2).wait()
        assert mgr.load(str(tmp_path / "checkpoint-1")).step == 1
        assert mgr.load(tmp_path / "checkpoint-1").step == 1
        assert mgr.load().step == 2
        assert mgr.latest() == tmp_path / "checkpoint-2"


def test_load_nonexistent_path(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        with pytest.raises(CheckpointNotFoundError):
            mgr.load(tmp_path / "checkpoint-404")
        with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for callers that catch that
            mgr.load(str(tmp_path / "nope"))


def test_nothing_to_load_returns_none(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path / "fresh", _components(model, opt)) as mgr:
        assert mgr.load() is None
        assert mgr.latest() is None


def test_point_in_time_snapshot(tmp_path):
    """Mutations right after save() returns never reach the checkpoint, even before it is written."""
    model, opt = _setup()
    gate = _GateComponent()
    expected_model, expected_opt = _clone(model.state_dict()), _clone(opt.state_dict())
    comps = [StateComponent("gate", gate)] + _components(model, opt, rng=False)  # gate first: holds the only I/O thread
    with CheckpointManager(tmp_path, comps, num_io_threads=1) as mgr:
        handle = mgr.save(3)
        assert gate.gate.entered.wait(10)
        assert not handle.done()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-2).add_(1)
        _train_step(model, opt)
        for state in opt.state.values():
            state["exp_avg_sq"].add_(5)
            state["step"].add_(1000)
        opt.param_groups[0]["lr"] = 7.0
        gate.gate.open.set()
        handle.wait()
    fresh_model, fresh_opt = _setup(seed=5, steps=1)
    with CheckpointManager(tmp_path, [StateComponent("gate", _GateComponent())] + _components(fresh_model, fresh_opt, rng=False)) as mgr:
        assert mgr.load().loaded == ["gate", "model", "optimizer"]
    _assert_same(fresh_model.state_dict(), expected_model)
    _assert_same(fresh_opt.state_dict(), expected_opt)


def _seed_all() -> None:
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)


def test_sync_and_async_write_the_same_bytes(tmp_path):
    manifests = {}
    for mode in (True, False):
        model, opt = _setup(seed=3)
        with CheckpointManager(tmp_path / str(mode), _components(model, opt), async_save=mode) as mgr:
            _seed_all()
            handle = mgr.save(4)
            if not mode:
                assert handle.done()  # sync: committed before save() returns
            handle.wait()
        manifests[mode] = read_manifest(tmp_path / str(mode) / "checkpoint-4")
    a, b = manifests[True].files, manifests[False].files
    assert {n: (e.size, e.xxh3) for n, e in a.items()} == {n: (e.size, e.xxh3) for n, e in b.items()}
    for name in a:
        assert (tmp_path / "True" / "checkpoint-4" / name).read_bytes() == (tmp_path / "False" / "checkpoint-4" / name).read_bytes()


def test_zstd_round_trip(tmp_path):
    model, opt = _setup()
    expected = _clone(model.state_dict())
    with CheckpointManager(tmp_path, _components(model, opt), compression="zstd", compression_level=3) as mgr:
        mgr.save(1).wait()
    directory = tmp_path / "checkpoint-1"
    assert _names(directory) == [MANIFEST_NAME, "model.safetensors.zst", "optimizer_state.pt.zst", "rng_state.pt.zst"]
    manifest = read_manifest(directory)
    assert {e.codec for e in manifest.files.values()} == {"zstd"}
    for name, entry in manifest.files.items():
        assert hash_file(directory / name) == (entry.size, entry.xxh3)
    fresh_model, fresh_opt = _setup(seed=8)
    with CheckpointManager(tmp_path, _components(fresh_model, fresh_opt)) as mgr:  # reader needs no compression flag
        assert mgr.load().loaded == ["model", "optimizer", "rng"]
    _assert_same(fresh_model.state_dict(), expected)


def test_save_total_limit_keeps_newest(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt), save_total_limit=2) as mgr:
        for step in (1, 2, 3, 10, 4):
            mgr.save(step).wait()  # retention runs after the handle resolves, on the commit thread
            assert len(list_committed(tmp_path)) <= 3
    # close() drained the commit thread, retention included.
    # Step 4 after 10: the newest *step* (10) is never deleted.
    assert [s for s, _ in list_committed(tmp_path)] == [4, 10]
    assert list_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ save failures


def test_failing_state_dict_fails_the_save(tmp_path):
    model, opt = _setup()
    flaky = _Flaky()
    with CheckpointManager(tmp_path, _components(model, opt, StateComponent("flaky", flaky))) as mgr:
        mgr.save(1).wait()
        flaky.fail = True
        handle = mgr.save(2)  # a snapshot failure does not raise on the training thread
        with pytest.raises(CheckpointSaveError) as info:
            handle.wait()
        text = str(info.value)
        assert "component 'flaky'" in text and "step 2" in text and "snapshot" in text and "flaky state_dict exploded" in text
        assert handle.failed() and isinstance(handle.exception(), CheckpointSaveError)
        assert not (tmp_path / "checkpoint-2").exists()
        assert list_leftovers(tmp_path) == []
        flaky.fail = False
        assert mgr.save(3).wait() == tmp_path / "checkpoint-3"
    assert [s for s, _ in list_committed(tmp_path)] == [1, 3]


@pytest.mark.parametrize("point,phase", [("mid_write", "write"), ("before_fsync", "write"), ("before_rename", "write"), ("before_manifest", "commit"), ("before_publish", "commit")])
def test_fault_points_leave_no_commit(tmp_path, point, phase):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        mgr.save(1).wait()
        before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()}
        faults.arm(point)
        try:
            handle = mgr.save(2)
            with pytest.raises(CheckpointSaveError) as info:
                handle.wait()
        finally:
            faults.disarm()
        assert f"injected fault at {point}" in str(info.value)
        assert "rank 0" in str(info.value) and "step 2" in str(info.value) and f"phase {phase}" in str(info.value)
        assert not (tmp_path / "checkpoint-2").exists()
        assert list_leftovers(tmp_path) == []
        assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()} == before
        assert check_files(tmp_path / "checkpoint-1", read_manifest(tmp_path / "checkpoint-1")) == ([], [])
        assert mgr.save(3).wait() == tmp_path / "checkpoint-3"
        assert mgr.load().step == 3
    assert [s for s, _ in list_committed(tmp_path)] == [1, 3]


def test_retention_failure_does_not_fail_the_save(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt), save_total_limit=1) as mgr:
        mgr.save(1).wait()
        faults.arm("before_retention")
        try:
            assert mgr.save(2).wait() == tmp_path / "checkpoint-2"
        finally:
            faults.disarm()
        mgr.save(3).wait()
    assert [s for s, _ in list_committed(tmp_path)] == [3]


def _wait_done(handle, timeout: float = 10.0) -> None:
    """Wait for a handle to resolve without observing its failure."""
    deadline = time.monotonic() + timeout
    while not handle.done():
        assert time.monotonic() < deadline, "save never finished"
        time.sleep(0.005)


def test_unobserved_failure_raised_once_by_next_save(tmp_path):
    model, opt = _setup()
    flaky = _Flaky()
    with CheckpointManager(tmp_path, _components(model, opt, StateComponent("flaky", flaky))) as mgr:
        flaky.fail = True
        failed = mgr.save(1)
        flaky.fail = False
        _wait_done(failed)
        with pytest.raises(CheckpointSaveError, match="flaky state_dict exploded"):
            mgr.save(2)
        assert not (tmp_path / "checkpoint-2").exists()  # the save that raised took no snapshot
        assert mgr.save(3).wait() == tmp_path / "checkpoint-3"
        assert mgr.save(4).wait() == tmp_path / "checkpoint-4"
    assert [s for s, _ in list_committed(tmp_path)] == [3, 4]


def test_unobserved_failure_raised_by_wait_and_close(tmp_path):
    model, opt = _setup()
    flaky = _Flaky()
    mgr = CheckpointManager(tmp_path, _components(model, opt, StateComponent("flaky", flaky)))
    flaky.fail = True
    mgr.save(1)
    with pytest.raises(CheckpointSaveError, match="flaky"):
        mgr.wait()
    assert mgr.wait() is None  # raised once
    flaky.fail = True
    mgr.save(2)
    with pytest.raises(CheckpointSaveError, match="flaky"):
        mgr.close()
    mgr.close()  # idempotent, and the failure was raised once


def test_failure_of_overtaken_save_is_not_lost(tmp_path, monkeypatch):
    model, opt = _setup()
    flaky = _Flaky()
    mgr = CheckpointManager(tmp_path, _components(model, opt, StateComponent("flaky", flaky), rng=False))
    channel = mgr._ctx.channel
    collect = channel.collect

    def slow_collect(seq, timeout_s):  # stands in for a slow rank: step 1's commit outlives its write
        if seq == 0:
            time.sleep(1.0)
        return collect(seq, timeout_s)

    monkeypatch.setattr(channel, "collect", slow_collect)
    flaky.fail = True
    first = mgr.save(1)
    flaky.fail = False
    raised = []
    try:
        for step in (2, 3):
            try:
                mgr.save(step).wait()
            except CheckpointSaveError as exc:
                raised.append(exc)
        try:
            mgr.close()
        except CheckpointSaveError as exc:
            raised.append(exc)
    finally:
        mgr.close()
    assert first.failed()
    assert raised, "step 1 failed, but neither save(), wait() nor close() ever raised it"


class _NumpyState:
    """A component whose state holds a NumPy array: torch.save writes it, weights_only cannot read it."""

    def __init__(self) -> None:
        self.state = {"position": np.arange(3), "epoch": 1}

    def state_dict(self):
        return self.state

    def load_state_dict(self, sd) -> None:
        self.state = sd


def test_state_that_cannot_load_is_refused_at_save(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt, StateComponent("data", _NumpyState()), rng=False)) as mgr:
        try:
            mgr.save(1).wait()
        except CheckpointSaveError as exc:  # one acceptable fix: refuse at save time, naming the component
            assert "'data'" in str(exc)
            assert not (tmp_path / "checkpoint-1").exists()
            return
        result = mgr.load()  # the other: the committed checkpoint loads
        assert result is not None and "data" in result.loaded


# ------------------------------------------------------------------------------ busy policies


def test_on_busy_skip_while_in_flight(tmp_path):
    model, opt = _setup()
    gate = _GateComponent()
    with CheckpointManager(tmp_path, _components(model, opt, StateComponent("gate", gate)), on_busy="skip", num_io_threads=1) as mgr:
        first = mgr.save(1)
        assert gate.gate.entered.wait(10)
        skipped = mgr.save(2)
        assert skipped.skipped and skipped.done() and skipped.wait() is None
        assert "skipped" in repr(skipped)
        gate.gate.open.set()
        assert first.wait() == tmp_path / "checkpoint-1"
        third = mgr.save(3)
        assert not third.skipped and third.wait() == tmp_path / "checkpoint-3"
    assert [s for s, _ in list_committed(tmp_path)] == [1, 3]


def test_on_busy_skip_when_buffers_held(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt), on_busy="skip") as mgr:
        mgr.save(1).wait()
        mgr._last._released.clear()
        assert mgr.save(2).skipped
        mgr._last._released.set()
        assert not mgr.save(3).skipped


def test_on_busy_block_waits_for_buffers(tmp_path):
    model, opt = _setup()
    gate = _GateComponent()
    with CheckpointManager(tmp_path, _components(model, opt, StateComponent("gate", gate)), num_io_threads=1) as mgr:
        first = mgr.save(1)
        assert gate.gate.entered.wait(10)
        second: list = []
        thread = threading.Thread(target=lambda: second.append(mgr.save(2)))
        thread.start()
        thread.join(0.2)
        assert thread.is_alive() and not second  # blocked behind the first save's buffers
        gate.gate.open.set()
        thread.join(10)
        assert first.wait() == tmp_path / "checkpoint-1"
        assert second[0].wait() == tmp_path / "checkpoint-2"


# ------------------------------------------------------------------------------ recovery


def _two_checkpoints(tmp_path: Path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        mgr.save(1).wait()
        expected = _clone(model.state_dict())
        _train_step(model, opt)
        mgr.save(2).wait()
    return expected


def test_auto_resume_skips_damaged_newest(tmp_path, caplog):
    expected = _two_checkpoints(tmp_path)
    _flip_byte(tmp_path / "checkpoint-2" / "model.safetensors")
    model, opt = _setup(seed=4)
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr, caplog.at_level(logging.WARNING, logger="async_ckpt"):
        result = mgr.load()
    assert result.step == 1
    _assert_same(model.state_dict(), expected)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "checkpoint-2" in warning and "model.safetensors" in warning and "Hash mismatch" in warning


def test_explicit_damaged_path_raises(tmp_path):
    _two_checkpoints(tmp_path)
    _flip_byte(tmp_path / "checkpoint-2" / "optimizer_state.pt")
    model, opt = _setup(seed=4)
    before = _clone(model.state_dict())
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        with pytest.raises(CheckpointCorruptError, match="optimizer_state.pt"):
            mgr.load(tmp_path / "checkpoint-2")
    _assert_same(model.state_dict(), before)  # nothing half-loaded


def test_all_damaged_raises(tmp_path):
    _two_checkpoints(tmp_path)
    for step in (1, 2):
        _flip_byte(tmp_path / f"checkpoint-{step}" / "model.safetensors")
    model, opt = _setup(seed=4)
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        with pytest.raises(CheckpointCorruptError, match="No committed checkpoint"):
            mgr.load()


def test_deleted_optional_file_strict_and_not(tmp_path):
    expected = _two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-2" / "optimizer_state.pt").unlink()
    model, opt = _setup(seed=4)
    opt_before = _clone(opt.state_dict())
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        with pytest.raises(CheckpointLoadError, match="optimizer"):
            mgr.load(strict=True)
        result = mgr.load(tmp_path / "checkpoint-2", strict=False)
    assert result.step == 2 and result.skipped == ["optimizer"] and result.loaded == ["model", "rng"]
    _assert_same(opt.state_dict(), opt_before)  # left as it was
    with pytest.raises(AssertionError):
        _assert_same(model.state_dict(), expected)  # step 2's weights, not step 1's


def test_deleted_required_model_file_falls_back(tmp_path):
    expected = _two_checkpoints(tmp_path)
    (tmp_path / "checkpoint-2" / "model.safetensors").unlink()
    model, opt = _setup(seed=4)
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        assert mgr.load(strict=False).step == 1
        with pytest.raises(CheckpointCorruptError, match="required component 'model'"):
            mgr.load(tmp_path / "checkpoint-2", strict=False)
    _assert_same(model.state_dict(), expected)


def _bump_format(directory: Path) -> None:
    raw = json.loads((directory / MANIFEST_NAME).read_text())
    raw["format_version"] = 99
    (directory / MANIFEST_NAME).write_text(json.dumps(raw))


def test_newer_format_version_explicit_refused_with_clear_message(tmp_path):
    _two_checkpoints(tmp_path)
    _bump_format(tmp_path / "checkpoint-2")
    model, opt = _setup(seed=4)
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        with pytest.raises(CheckpointCorruptError, match="format_version 99.*upgrade async_ckpt"):
            mgr.load(tmp_path / "checkpoint-2")
        assert mgr.load().step == 1  # auto-resume skips it


def test_newer_format_version_explicit_raises_format_error(tmp_path):
    _two_checkpoints(tmp_path)
    _bump_format(tmp_path / "checkpoint-2")
    model, opt = _setup(seed=4)
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        with pytest.raises(CheckpointFormatError):
            mgr.load(tmp_path / "checkpoint-2")


def test_leftovers_removed_at_start(tmp_path):
    _two_checkpoints(tmp_path)
    staging = tmp_path / ".checkpoint-9.staging-abc"
    staging.mkdir()
    (staging / "model.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / ".checkpoint-1.deleting-def").mkdir()
    model, opt = _setup(seed=4)
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        assert _names(tmp_path) == ["checkpoint-1", "checkpoint-2"]
        assert mgr.load().step == 2


def test_rewind_replaces_checkpoint_after_new_one_is_complete(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        mgr.save(5).wait()
        old = (tmp_path / "checkpoint-5" / "model.safetensors").read_bytes()
        with torch.no_grad():
            model.hidden.weight.fill_(0.25)
        expected = _clone(model.state_dict())
        mgr.save(5).wait()
    assert (tmp_path / "checkpoint-5" / "model.safetensors").read_bytes() != old
    assert _names(tmp_path) == ["checkpoint-5"]
    fresh_model, fresh_opt = _setup(seed=4)
    with CheckpointManager(tmp_path, _components(fresh_model, fresh_opt)) as mgr:
        mgr.load()
    _assert_same(fresh_model.state_dict(), expected)


# ------------------------------------------------------------------------------ handle and lifecycle


def test_await_handle(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:

        async def main():
            return await mgr.save(7)

        assert asyncio.run(main()) == tmp_path / "checkpoint-7"


def test_await_failed_handle_raises(tmp_path):
    model, opt = _setup()
    flaky = _Flaky()
    with CheckpointManager(tmp_path, _components(model, opt, StateComponent("flaky", flaky))) as mgr:
        flaky.fail = True
        handle = mgr.save(1)

        async def main():
            return await handle

        with pytest.raises(CheckpointSaveError, match="flaky"):
            asyncio.run(main())
        assert handle.observed
        flaky.fail = False
        assert mgr.save(2).wait() is not None  # observed once: not raised again


def test_wait_with_timeout_does_not_cancel_the_save(tmp_path):
    model, opt = _setup()
    gate = _GateComponent()
    with CheckpointManager(tmp_path, _components(model, opt, StateComponent("gate", gate)), num_io_threads=1) as mgr:
        handle = mgr.save(1)
        assert gate.gate.entered.wait(10)
        with pytest.raises(CheckpointTimeoutError, match="step 1"):
            handle.wait(timeout=0.05)
        assert "in flight" in repr(handle) and not handle.done()
        gate.gate.open.set()
        assert handle.wait() == tmp_path / "checkpoint-1"


def test_context_manager_closes(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        handle = mgr.save(1)
    assert handle.done() and (tmp_path / "checkpoint-1").is_dir()  # close drained the save
    with pytest.raises(CheckpointError, match="closed"):
        mgr.save(2)
    with pytest.raises(CheckpointError, match="closed"):
        mgr.load()
    mgr.close()


def test_context_manager_does_not_hide_the_unwinding_error(tmp_path):
    model, opt = _setup()
    flaky = _Flaky()
    with pytest.raises(KeyError, match="training crashed"):
        with CheckpointManager(tmp_path, _components(model, opt, StateComponent("flaky", flaky))) as mgr:
            flaky.fail = True
            mgr.save(1)
            raise KeyError("training crashed")


def test_prepare_then_save_allocates_nothing(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        mgr.prepare()
        allocated = mgr._pool.stats.allocations
        assert allocated > 0
        mgr.save(1).wait()
        assert mgr._pool.stats.allocations == allocated
        _train_step(model, opt)
        mgr.save(2).wait()
        assert mgr._pool.stats.allocations == allocated


def test_handle_timings_and_repr(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        handle = mgr.save(1)
        handle.wait()
        assert {"stall_s", "snapshot_s", "persist_s"} <= set(handle.timings)
        assert "committed" in repr(handle)
    timings = read_manifest(tmp_path / "checkpoint-1").timings
    assert "stall_s" in timings["0"] and "commit_wait_s" in timings["0"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_io_threads": 0}, "num_io_threads"),
        ({"compression": "gzip"}, "compression"),
        ({"compression": "zstd", "compression_level": 99}, "compression_level"),
        ({"save_total_limit": 0}, "save_total_limit"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"on_busy": "queue"}, "on_busy"),
    ],
)
def test_bad_arguments_refused(tmp_path, kwargs, match):
    model, opt = _setup()
    with pytest.raises(CheckpointConfigError, match=match):
        CheckpointManager(tmp_path, _components(model, opt), **kwargs)


def test_duplicate_components_refused(tmp_path):
    model, opt = _setup()
    with pytest.raises(CheckpointConfigError, match="Duplicate"):
        CheckpointManager(tmp_path, [StateComponent("model", model), StateComponent("model", opt)])


def test_staging_dir_that_cannot_be_created_fails_the_save_instead_of_hanging(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt)) as mgr:
        mgr.save(1).wait()
        blocker = tmp_path / staging_dirname(2, f"{mgr.run_id}-1")  # a file where save 2's staging directory goes
        blocker.write_bytes(b"in the way")
        with pytest.raises(CheckpointSaveError, match=r"phase write\] FileExistsError"):
            mgr.save(2).wait(timeout=30)
        blocker.unlink()
        assert mgr.save(3).wait() == tmp_path / "checkpoint-3"
    assert [step for step, _ in list_committed(tmp_path)] == [1, 3]


def test_io_nice_lowers_only_the_background_threads(tmp_path):

    def nice_of_this_thread():
        return int(open(f"/proc/self/task/{threading.get_native_id()}/stat").read().rsplit(")", 1)[1].split()[16])

    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt), io_nice=7) as mgr:
        assert mgr._io.submit(nice_of_this_thread).result() == 7
        assert mgr._committer.submit(nice_of_this_thread).result() == 7
        assert nice_of_this_thread() == 0
        assert mgr.save(1).wait() == tmp_path / "checkpoint-1"
    with pytest.raises(CheckpointConfigError, match="io_nice"):
        CheckpointManager(tmp_path, _components(model, opt), io_nice=25)


def test_protected_checkpoint_survives_retention(tmp_path):
    model, opt = _setup()
    with CheckpointManager(tmp_path, _components(model, opt), save_total_limit=2) as mgr:
        mgr.save(1).wait()
        mgr.protect(1)  # say step 1 had the best eval loss
        for step in (2, 3, 4):
            mgr.save(step)
        mgr.wait()  # retention included
        assert [s for s, _ in list_committed(tmp_path)] == [1, 4]
        mgr.protect(1, keep=False)
        mgr.save(5)
        mgr.wait()
        assert [s for s, _ in list_committed(tmp_path)] == [4, 5]


def test_by_rank_groups_identical_messages():
    from async_ckpt.loading import by_rank

    assert by_rank([["m"], ["m"], ["x"], ["m"], []]) == ["rank(s) 0-1, 3: m", "rank(s) 2: x"]
    assert by_rank([[], []]) == []
    assert by_rank([["a", "b"]]) == ["rank(s) 0: a", "rank(s) 0: b"]


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 1), (3, 2), (5, 4), (64, 4)])
def test_default_io_threads_leave_a_core_to_training(monkeypatch, tmp_path, cores, expected):
    from async_ckpt import config

    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert config.default_io_threads() == expected
    with CheckpointManager(tmp_path, [StateComponent("model", torch.nn.Linear(2, 2), required=True)]) as mgr:
        assert mgr._io._max_workers == expected
    with pytest.raises(CheckpointConfigError, match="num_io_threads"):
        CheckpointManager(tmp_path, [StateComponent("model", torch.nn.Linear(2, 2), required=True)], num_io_threads=0)
