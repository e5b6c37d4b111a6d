"""The multi-process helper itself: results by rank, errors with tracebacks, hangs killed."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers.spawn import run_ranks, run_ranks_expect

pytestmark = [pytest.mark.timeout(120), pytest.mark.distributed]


# Functions run in the ranks: module level, so they pickle by name.


def _all_reduce(rank: int, world_size: int, base: float) -> torch.Tensor:
    tensor = torch.tensor([base * (rank + 1)])
    dist.all_reduce(tensor)
    return tensor


def _raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError(f"boom on rank {rank}")
    return rank


def _hang_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(3600)
    return rank


def _exit_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    return rank


def _read_env(rank: int, world_size: int) -> dict:
    names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK", "GROUP_RANK", "SHARED")
    return {name: os.environ.get(name) for name in names} | {"threads": torch.get_num_threads()}


def _return_unpicklable(rank: int, world_size: int):
    return lambda: rank


def _no_children_left() -> bool:
    return multiprocessing.active_children() == []


def test_two_ranks_all_reduce_and_return_by_rank():
    results = run_ranks(_all_reduce, 2, 1.0)
    assert [t.tolist() for t in results] == [[3.0], [3.0]]
    assert _no_children_left()


def test_single_rank():
    assert [t.item() for t in run_ranks(_all_reduce, 1, 5.0)] == [5.0]


def test_raising_rank_is_reported_with_its_traceback():
    with pytest.raises(AssertionError) as info:
        run_ranks(_raise_on_rank_one, 2)
    text = str(info.value)
    assert "1 of 2 ranks failed" in text
    assert "rank 1: ValueError: boom on rank 1" in text
    assert "Traceback (most recent call last)" in text
    assert "in _raise_on_rank_one" in text
    assert "rank 0:" not in text
    assert _no_children_left()


def test_expect_variant_returns_outcomes_without_raising():
    assert run_ranks_expect(_raise_on_rank_one, 2) == [
        ("ok", 0),
        ("error", "ValueError", "boom on rank 1"),
    ]


def test_hanging_rank_is_killed_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks(_hang_on_rank_one, 2, timeout=10)
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "ranks [1] of 2 did not finish" in text
    assert "_hang_on_rank_one" in text  # the hung rank's stack, dumped by faulthandler
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert _no_children_left()


def test_rank_that_dies_without_reporting():
    assert run_ranks_expect(_exit_on_rank_one, 2) == [
        ("ok", 0),
        ("error", "ProcessDied", "exit code 3"),
    ]
    assert _no_children_left()


def test_env_dict_and_per_rank_callable():
    first, second = run_ranks(
        _read_env, 2, env=lambda rank: {"LOCAL_RANK": rank, "GROUP_RANK": 7, "SHARED": "x"}
    )
    assert first == {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                     "LOCAL_RANK": "0", "GROUP_RANK": "7", "SHARED": "x", "threads": 1}
    assert second["RANK"] == "1" and second["LOCAL_RANK"] == "1"
    (only,) = run_ranks(_read_env, 1, env={"SHARED": "y"})
    assert only["SHARED"] == "y" and only["LOCAL_RANK"] is None


def test_unpicklable_return_value_is_a_failure():
    with pytest.raises(AssertionError, match="rank 0: .*(Pickl|pickle)"):
        run_ranks(_return_unpicklable, 1)


def test_unpicklable_function_is_refused_before_starting():
    with pytest.raises(TypeError, match="module level"):
        run_ranks(lambda rank, world_size: rank, 2)
    assert _no_children_left()


def test_stack_dumps_kept_under_tmp_path(tmp_path):
    with pytest.raises(AssertionError):
        run_ranks(_hang_on_rank_one, 2, timeout=5, tmp_path=tmp_path)
    assert "_hang_on_rank_one" in (tmp_path / "_run_ranks" / "rank_1.stacks").read_text()
