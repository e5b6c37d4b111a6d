"""validate_replication on real gloo ranks: every rank passes, or every rank raises the same error.

Each world size is spawned once (module fixture) and runs the whole table of cases in that one
process group, so the file costs two spawns; the tests then assert on the recorded outcomes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from async_ckpt.components import ValidationLevel
from async_ckpt.errors import ReplicationValidationError
from async_ckpt.validation import validate_replication
from tests.helpers.spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

LEVELS = [ValidationLevel.QUICK, ValidationLevel.TENSOR, ValidationLevel.FULL]
PREFIX = "Replication validation failed for component 'optim'"


def _state(rank: int, case: str) -> dict:
    """An Adam-like state dict with bf16 tensors two levels down; ``case`` says how rank 1 diverges."""
    gen = torch.Generator().manual_seed(0)
    state = {
        "state": {
            0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(200, generator=gen).to(torch.bfloat16)},
            1: {"step": torch.tensor(5.0), "exp_avg": torch.randn(3, 4, generator=gen), "empty": torch.empty(0)},
        },
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}],
    }
    if rank != 1:
        return state
    if case == "element50":
        state["state"][0]["exp_avg"][50] += 1
    elif case == "shape":  # same number of bytes, other shape: FULL must not all_gather it
        state["state"][1]["exp_avg"] = state["state"][1]["exp_avg"].reshape(4, 3)
    elif case == "missing":
        del state["state"][1]["exp_avg"]
    elif case == "lr":
        state["param_groups"][0]["lr"] = 2e-3
    elif case == "meta":  # cannot be read: rank 1 must still join the collective
        state["state"][0]["exp_avg"] = torch.empty(200, dtype=torch.bfloat16, device="meta")
    return state


CASES = ["same", "element50", "shape", "missing", "lr", "meta"]


def _run_table(rank: int, world_size: int) -> dict:
    """On every rank: each (case, level) once, in the same order; record ok or the error text."""
    outcomes = {}
    group = dist.group.WORLD
    for case in CASES:
        for level in [ValidationLevel.NONE, *LEVELS]:
            try:
                validate_replication("optim", _state(rank, case), level, group, rank=rank, step=40)
                outcomes[(case, level.value)] = "ok"
            except ReplicationValidationError as exc:
                outcomes[(case, level.value)] = str(exc)
    validate_replication("optim", _state(rank, "element50"), ValidationLevel.FULL, None, rank=rank)
    return outcomes


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def table(request) -> tuple[int, list[dict]]:
    world = request.param
    return world, run_ranks(_run_table, world, timeout=100)


def _all_fail(world: int, results: list[dict], case: str, level: str) -> list[str]:
    texts = [results[r][(case, level)] for r in range(world)]
    for r, text in enumerate(texts):
        assert text.startswith(PREFIX), f"rank {r}, {case}/{level}: {text}"
        assert f"[rank {r} step 40]" in text
    # the same verdict and the same text on every rank, but for the rank prefix
    assert len({t.replace(f"[rank {r} step 40]", "") for r, t in enumerate(texts)}) == 1
    return texts


def test_identical_states_pass_at_every_level(table):
    world, results = table
    for r in range(world):
        for level in ["none", "quick", "tensor", "full"]:
            assert results[r][("same", level)] == "ok", (r, level)


def test_none_level_never_compares(table):
    world, results = table
    for case in CASES:
        assert all(results[r][(case, "none")] == "ok" for r in range(world))


@pytest.mark.parametrize("level", ["quick", "tensor", "full"])
def test_diverged_rank_fails_on_every_rank(table, level):
    world, results = table
    text = _all_fail(world, results, "element50", level)[0]
    assert "rank(s) 1 differ from rank 0" in text
    if level != "quick":
        assert "'state.0.exp_avg'" in text
        assert "state.1" not in text


@pytest.mark.parametrize("level", ["tensor", "full"])
def test_shape_difference_is_named(table, level):
    world, results = table
    text = _all_fail(world, results, "shape", level)[0]
    assert "'state.1.exp_avg' is torch.float32[4, 3] (rank 0: torch.float32[3, 4]) on rank(s) 1" in text


@pytest.mark.parametrize("level", ["tensor", "full"])
def test_missing_key_is_named(table, level):
    world, results = table
    text = _all_fail(world, results, "missing", level)[0]
    assert "rank(s) 1 differ from rank 0" in text
    assert "'state.1.exp_avg' missing on rank(s) 1; '<non-tensor values>' differs on rank(s) 1" in text


@pytest.mark.parametrize("level", ["quick", "tensor", "full"])
def test_non_tensor_difference_fails(table, level):
    world, results = table
    _all_fail(world, results, "lr", level)


@pytest.mark.parametrize("level", ["quick", "tensor", "full"])
def test_unreadable_state_on_one_rank_fails_everywhere_without_hanging(table, level):
    world, results = table
    text = _all_fail(world, results, "meta", level)[0]
    assert "rank(s) 1 could not be checked" in text
    assert "tensor 'state.0.exp_avg' is on the meta device" in text
